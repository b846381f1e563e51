"""CUDA fast path checks (Triton kernels, the decode GEMV and its tuning, CUDA-graph decode steps).
Skipped without a GPU."""

from __future__ import annotations

import copy

import math

import pytest
import torch
import torch.nn.functional as F

from telechat.engine.paged_attention import (DEFAULT_CONFIG, DecodeKernelConfig, _gather_decode, num_partitions,
                                             paged_decode_attention)
from telechat.engine.scheduler_output import SchedulerOutput
from telechat.model import kernels
from telechat.model.config import TelechatConfig
from telechat.model.kernels import (GEMV_CANDIDATES, GemvConfig, fused_add_rms_norm, gemv, rms_norm_reference,
                                    rope_and_cache, silu_mul, swiglu)
from telechat.model.modeling import TelechatForCausalLM
from telechat.model.rope import apply_rope
from tests.engine.test_runner import Steps, hf_generate, prompt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bsz", [1, 5, 256])
@pytest.mark.parametrize("n_kv, d", [(4, 128), (2, 160), (8, 64)])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("config", [DEFAULT_CONFIG, DecodeKernelConfig(tokens=16, num_warps=2, num_stages=1, early_v=True),
                                    DecodeKernelConfig(tokens=32, num_warps=8, num_stages=3, target_programs=8192)])
def test_triton_paged_attention_matches_gather(n_kv, d, bsz, fp8, config):
    """The Triton kernel equals gather + SDPA on random paged data (head_dim 160 = 12B included), with
    many partitions (1 sequence), a few (5) and one (256 sequences with the default launch shape: the
    kernel writes the output itself), and on an FP8 cache with scales, for several launch shapes; twice in a
    row, the partitions' merge leaving its arrival counters at zero each time."""
    torch.manual_seed(0)
    heads, bs, max_len = 8, 16, 3000
    blocks = bsz * math.ceil(max_len / bs) + 1
    kc = torch.randn(blocks * bs, n_kv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k_scale, v_scale = (0.25, 0.5) if fp8 else (1.0, 1.0)
    if fp8:
        kc, vc = (kc / k_scale).to(torch.float8_e4m3fn), (vc / v_scale).to(torch.float8_e4m3fn)
    table = (torch.randperm(blocks - 1, device="cuda")[: bsz * math.ceil(max_len / bs)] + 1).view(bsz, -1).int()
    lens = torch.tensor([1, 17, 500, 2999, 3000, 64, 65], device="cuda", dtype=torch.int32).repeat(bsz)[:bsz]
    q = torch.randn(bsz, heads, d, device="cuda", dtype=torch.bfloat16)
    assert (num_partitions(bsz, heads, max_len, config) == 1) == (bsz * heads >= config.target_programs)
    ref = _gather_decode(q.float(), kc if fp8 else kc.float(), vc if fp8 else vc.float(), table, lens, bs, k_scale,
                         v_scale)
    for _ in range(2):
        out = paged_decode_attention(q, kc, vc, table, lens, bs, k_scale, v_scale, config)
        assert (out.float() - ref).norm() / ref.norm() < 1e-2
        assert all(int(c.count_nonzero()) == 0 for c in kernels._arrival_counters.values())


@pytest.mark.parametrize("n_kv, d", [(8, 128), (2, 160)], ids=["mha-128", "gqa-160"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-cache", "fp8-cache"])
@pytest.mark.parametrize("target_programs", [1, 1024], ids=["one-partition", "partitioned"])
def test_prefix_prefill_kernel_matches_gather(n_kv, d, fp8, target_programs):
    """Chunks continuing cached context (a few tokens to 150, over 1 to 3,000 cached positions, in random
    slots), attended in one launch straight from the cache — each context read by one program, or split into
    partitions merged afterwards (these few chunks make too few programs for the card) — equal gather + SDPA
    per chunk; rows of other chunks (decodes, fresh prompts) are left untouched."""
    from types import SimpleNamespace

    from telechat.engine.prefix_attention import chunk_tables, prefix_prefill_attention
    from telechat.model.attention import attention

    torch.manual_seed(0)
    heads, slots = 8, 16384
    kc = torch.randn(slots, n_kv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k_scale, v_scale = (0.25, 0.5) if fp8 else (1.0, 1.0)
    if fp8:
        kc, vc = (kc / k_scale).to(torch.float8_e4m3fn), (vc / v_scale).to(torch.float8_e4m3fn)
    chunks, row = [], 5  # rows 0-4: not context chunks
    for start, end in [(1, 2), (64, 128), (3000, 3150), (100, 101), (4000, 4033)]:
        chunks.append(SimpleNamespace(row=row, start=start, end=end,
                                      context_slots=torch.randperm(slots, device="cuda")[:end]))
        row += end - start
    q = torch.randn(row, heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, 7.0)
    prefix_prefill_attention(q, kc, vc, chunk_tables(chunks, q.device), out, k_scale, v_scale, target_programs)
    assert bool((out[:5] == 7.0).all())
    for c in chunks:
        n = c.end - c.start
        kk, vv = ((t[c.context_slots].float() * scale).transpose(0, 1)[None]
                  for t, scale in ((kc, k_scale), (vc, v_scale)))
        ref = attention(q[c.row:c.row + n].float().transpose(0, 1)[None], kk, vv, causal=True)[0].transpose(0, 1)
        got = out[c.row:c.row + n].float()
        assert (got - ref).norm() / ref.norm() < 1e-2, (c.start, c.end)


@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("tq, tk", [(131, 131), (48, 4433)])
def test_attention_never_plans_with_cudnn(heads, kv_heads, tq, tk):
    """Causal (fresh and after a cached context) and masked attention match float32 SDPA and run no cuDNN
    kernel: cuDNN builds a plan for every new shape, which a server meets with nearly every prompt."""
    from torch.profiler import ProfilerActivity, profile

    from telechat.model.attention import attention

    torch.manual_seed(0)
    q = torch.randn(3, heads, tq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(3, kv_heads, tk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    causal = torch.arange(tk, device="cuda")[None, :] <= torch.arange(tk - tq, tk, device="cuda")[:, None]
    padded = causal.clone()
    padded[:, :5] = False
    ref = {name: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                                  enable_gqa=heads != kv_heads) for name, m in
           (("causal", causal), ("masked", padded))}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = {"causal": attention(q, k, v, causal=True), "masked": attention(q, k, v, mask=padded[None, None])}
        torch.cuda.synchronize()
    for name in ref:
        torch.testing.assert_close(got[name].float(), ref[name], atol=2e-2, rtol=2e-2)
    kernels = [e.key for e in prof.key_averages()]
    assert kernels and not [n for n in kernels if "cudnn" in n.lower()], kernels


def test_rope_and_cache_writes_fp8_like_the_reference():
    """The fused rotary + cache write into an FP8 cache stores exactly the fused bf16 write divided by the
    scale, saturated at ±448 and rounded to E4M3 (as the PyTorch path quantizes)."""
    torch.manual_seed(0)
    t, nq, nkv, d = 6, 8, 2, 128
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16) * 4 for h in (nq, nkv, nkv))
    cos, sin = (torch.randn(t, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.tensor([3, 9, 17, 40, 63, 1], device="cuda")
    kc8, vc8 = (torch.zeros(64, nkv, d, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(2))
    kc, vc = (torch.zeros(64, nkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.inference_mode():
        q8 = rope_and_cache(q, k, v, cos, sin, kc8, vc8, slots, 0.02, 0.5)  # K saturates
        q16 = rope_and_cache(q, k, v, cos, sin, kc, vc, slots)
    assert torch.equal(q8, q16)
    assert (kc8.float().abs() == 448).any()
    for cache8, cache, scale in ((kc8, kc, 0.02), (vc8, vc, 0.5)):
        assert torch.equal(cache8.float(), (cache.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, bias", [(384, 512, False), (200, 4096, True), (4096, 1000, False)])
def test_triton_gemv_matches_matmul(dtype, n, k, bias):
    """Every GEMV tiling (all candidates the bench measures) equals torch matmul within bf16/fp16 tolerance
    for 1..8 rows (uneven N and K included)."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.05
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    for m in range(1, 9):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        for config in GEMV_CANDIDATES:
            if m <= config.max_m and config.kind != "dot8":  # FP8 tensor cores take FP8 weights only
                out = gemv(x, w, b, config).float()
                assert (out - ref).norm() / ref.norm() < 1e-2, (config, m)


@pytest.mark.parametrize("config", [GemvConfig(16, 256, split_k=4, serial_reduce=True),
                                    GemvConfig(64, 128, split_k=4, kind="dot_w", serial_reduce=True)])
def test_serial_split_k_gemv_replays_from_a_cuda_graph(config):
    """The split-K whose last program reduces (self-resetting counters) gives the right output on every
    replay of a captured graph, with new inputs copied in between, and leaves its counters zero."""
    torch.manual_seed(0)
    w = torch.randn(4096, 1000, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 1000, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        gemv(x, w, b, config)  # compiles and allocates the counters outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gemv(x, w, b, config)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            ref = F.linear(x.float(), w.float(), b.float())
            assert (out.float() - ref).norm() / ref.norm() < 1e-2
    torch.cuda.synchronize()
    assert int(kernels._arrival_counters[(x.device, "gemv")].count_nonzero()) == 0


def test_fused_kernels_match_reference_ops():
    """Triton add+RMSNorm, SwiGLU on halves and rope+cache write (on strided qkv views) equal the eager ops."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    x, r, w = (torch.randn(*shape, device="cuda", dtype=dt) for shape in ((7, 4096), (7, 4096), (4096,)))
    with torch.inference_mode():
        normed, h = fused_add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(h, x + r)
        torch.testing.assert_close(normed, rms_norm_reference(x + r, w, 1e-5), rtol=2e-2, atol=2e-2)
        gate_up = torch.randn(7, 2 * 1000, device="cuda", dtype=dt)
        torch.testing.assert_close(swiglu(gate_up), F.silu(gate_up[:, :1000]) * gate_up[:, 1000:], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(silu_mul(gate_up[:, :1000], gate_up[:, 1000:]), swiglu(gate_up))
        t, nq, nkv, d = 5, 8, 2, 128
        q, k, v = torch.randn(t, (nq + 2 * nkv) * d, device="cuda", dtype=dt).split([nq * d, nkv * d, nkv * d], -1)
        q, k, v = (z.view(t, -1, d) for z in (q, k, v))
        cos, sin = torch.randn(t, d, device="cuda", dtype=dt), torch.randn(t, d, device="cuda", dtype=dt)
        kc, vc = torch.zeros(64, nkv, d, device="cuda", dtype=dt), torch.zeros(64, nkv, d, device="cuda", dtype=dt)
        slots = torch.tensor([3, 9, 17, 40, 63], device="cuda")
        q_out = rope_and_cache(q, k, v, cos, sin, kc, vc, slots)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        torch.testing.assert_close(q_out, apply_rope(q, c, s), rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(kc[slots], apply_rope(k, c, s), rtol=2e-2, atol=5e-2)
        assert torch.equal(vc[slots], v)


def _model(dtype, **kw):
    torch.manual_seed(0)
    cfg = TelechatConfig(**{**dict(vocab_size=512, hidden_size=256, n_layer=2, n_head=4, ffn_hidden_size=512,
                                   training_seqlen=64, seq_length=1024, initializer_range=0.1), **kw})
    return TelechatForCausalLM(cfg).to("cuda", dtype).eval()


def _fp8_model(head: bool = False):
    """A bf16 model whose decoder Linears are all FP8 (per-channel weights, dynamic activations), the head bf16
    (FP8 too with ``head``, as ``--quantize-head`` writes it)."""
    from telechat.model.fp8 import Fp8Linear

    model = _model(torch.bfloat16, hidden_size=1024, ffn_hidden_size=2048, initializer_range=0.05)
    for layer in model.transformer.h:
        for name in ("self_attention.query", "self_attention.key_value", "self_attention.dense", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, Fp8Linear.from_linear(layer.get_submodule(name)))
    if head:
        model.lm_head = Fp8Linear.from_linear(model.lm_head)
    return model


def test_graph_decode_with_overlap_matches_generate_fp32():
    """Decode-only steps replay captured graphs (3 sequences in bucket 4), take their inputs from the
    previous step on the device, and reproduce generate() token for token past training_seqlen."""
    model = _model(torch.float32, num_key_value_heads=2)
    s = Steps(model, block_size=16, max_num_seqs=4)
    s.runner.capture_graphs()
    assert sorted(s.runner.graphs) == [1, 2, 4]
    reqs = [s.request(prompt(n, n)) for n in (5, 40, 90)]
    pending = s.runner.execute(SchedulerOutput(prefills=[s.chunk(r, 0, len(r.prompt_ids)) for r in reqs],
                                               new_rows=reqs))
    tokens = {r: [] for r in reqs}
    for _ in range(29):
        decodes = [s.chunk(r, len(r.prompt_ids) + len(tokens[r]), len(r.prompt_ids) + len(tokens[r]) + 1,
                           from_previous=True) for r in reqs]
        nxt = s.runner.execute(SchedulerOutput(decodes=decodes))
        for r, tok in zip(reqs, pending.tokens()):
            tokens[r].append(tok)
        pending = nxt
    for r, tok in zip(reqs, pending.tokens()):
        tokens[r].append(tok)
    for r in reqs:
        assert tokens[r] == hf_generate(model, r.prompt_ids, 30)[0]


def _use_pdl(monkeypatch, on: bool) -> None:
    """Kernels launch with programmatic dependent launch or not; on a Hopper card "on" really is on."""
    monkeypatch.setattr(kernels, "PDL", on)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert kernels.pdl_launch(torch.device("cuda"), 1) == on


@pytest.mark.parametrize("pdl", [False, True], ids=["plain-launch", "pdl"])
def test_bf16_graph_decode_logits_close_to_reference(monkeypatch, pdl):
    """bf16 graph decode steps (GEMV tuned at capture: Triton where it won) are as close to the float32
    truth as a full bf16 forward with RoPE fixed at the prompt length is: the engine's kernels (fused
    norms, fused projections, paged attention) add no error beyond bf16 rounding — also when each kernel
    starts before the previous one ends (programmatic dependent launch: a missing wait reads stale inputs)."""
    _use_pdl(monkeypatch, pdl)
    model = _model(torch.bfloat16, hidden_size=1024, ffn_hidden_size=2816, n_head=8)
    s = Steps(model, block_size=16, max_num_seqs=2)
    s.runner.capture_graphs()
    req = s.request(list(range(10, 60)))
    s.run(prefills=[s.chunk(req, 0, 50)], new=[req])
    logits = [s.last_logits[0].clone()]
    for _ in range(19):  # each replay overwrites the graph's output: keep copies
        s.run(decodes=[s.decode(req)])
        logits.append(s.last_logits[0].clone())
    seq = torch.tensor([(req.prompt_ids + req.output_ids)[:-1]], device="cuda")
    with torch.inference_mode():
        bf16 = model(seq, use_cache=False, rope_length=50).logits[0, 49:].float()
        truth = copy.deepcopy(model).float()(seq, use_cache=False, rope_length=50).logits[0, 49:]
    got = torch.stack(logits)
    engine_error = (got - truth).norm() / truth.norm()
    reference_error = (bf16 - truth).norm() / truth.norm()
    assert engine_error < 1.5 * reference_error + 1e-3, (engine_error, reference_error)


def test_linear_uses_the_tuned_gemv_only_where_it_won():
    """tune_gemv records a choice per (shape, rows); linear() then equals F.linear within bf16 tolerance
    for every bucket, whichever kernel it picked."""
    model = _model(torch.bfloat16, hidden_size=1024, ffn_hidden_size=2816, n_head=8)
    model.fuse_projections()
    rows = kernels.tune_gemv(model, [1, 2, 4, 8])
    shapes = {(lyr.weight.shape[0], lyr.weight.shape[1]) for lyr in model.modules() if type(lyr) is torch.nn.Linear}
    assert {(r["n"], r["k"]) for r in rows} == shapes and {r["m"] for r in rows} == {1, 2, 4, 8}
    with torch.inference_mode():
        for m in (1, 3, 8):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), model.lm_head.weight.float())
            assert (kernels.linear(x, model.lm_head).float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("pdl", [False, True], ids=["plain-launch", "pdl"])
def test_fp8_kv_cache_graph_decode_equals_eager(monkeypatch, pdl):
    """With an FP8 cache, graph-replayed decode steps give the eager steps' tokens (same kernels; the
    quality of the FP8 cache is measured on a trained model in tests/quant/test_fp8.py), with and without
    programmatic dependent launch."""
    _use_pdl(monkeypatch, pdl)
    from telechat.engine.core import EngineConfig, LLMEngine
    from telechat.engine.sampling import SamplingParams

    model = _model(torch.bfloat16, num_key_value_heads=2)
    prompts = [prompt(n, n) for n in (5, 40, 90)]
    params = SamplingParams(max_tokens=24, temperature=0)
    runs = {}
    for name, kv, graphs in (("fp8-graphs", "fp8", True), ("fp8-eager", "fp8", False)):
        engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_num_seqs=4, max_model_len=512, kv_cache_dtype=kv,
                                                              cuda_graphs=graphs))
        runs[name] = engine.generate(prompts, params)
    assert runs["fp8-graphs"] == runs["fp8-eager"]


@pytest.mark.parametrize("config", GEMV_CANDIDATES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_weight_gemv_matches_the_dequantized_weight(config, m, per_tensor, static):
    """Every tiling reads FP8 weights with per-channel (or per-tensor) scales: x @ (W_fp8 * s)ᵀ + b; the
    FP8 tensor-core tilings quantize x first (per token, or by a static input scale), as the FP8 Linear's
    own GEMM does, and give its numbers."""
    from telechat.model.fp8 import quantize_activation, quantize_weight

    if m > config.max_m:
        pytest.skip("tiling takes fewer rows")
    if static and config.kind != "dot8":
        pytest.skip("only FP8 tensor-core tilings read the input scale")
    torch.manual_seed(0)
    n, k = 1000, 4096
    q, scale = quantize_weight(torch.randn(n, k, device="cuda"))
    if per_tensor:
        scale = scale.max().reshape(1)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    input_scale = torch.tensor([0.02], device="cuda") if static else None
    with torch.inference_mode():
        out = gemv(x, q, bias, config, scale, input_scale)
    x_ref = x.float()
    if config.kind == "dot8":
        xq, xs = quantize_activation(x, input_scale)
        x_ref = xq.float() * xs
    ref = F.linear(x_ref, q.float() * scale.reshape(-1, 1), bias.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("head", [False, True], ids=["bf16-head", "fp8-head"])
def test_fp8_model_decodes_through_the_tuned_gemv(head):
    """An FP8 model (fused FP8 projections; the head FP8 too or not) tunes the GEMV for its FP8 shapes at
    capture, the head's included, and every token
    graph decode picks is, within a rounding margin, the best under one of the two computations the tuned
    kernels do: FP8 × FP8 (activations quantized per token: the model's unfused forward, ``_scaled_mm``) or
    weight-only (bf16 activations times the dequantized weights). Which one a shape gets is a timing race
    (run to run the tuner can pick either), so a near-tie may go either way — one step was seen 5.2 % of the
    logit spread below the FP8 × FP8 best — but a wrong input would pick tokens far below the best of both."""
    from telechat.engine.core import EngineConfig, LLMEngine
    from telechat.engine.sampling import SamplingParams
    from telechat.model.fp8 import Fp8Linear

    kernels._gemv_plan.clear()
    model = _fp8_model(head)
    reference = copy.deepcopy(model)
    weight_only = copy.deepcopy(model)
    for module in weight_only.modules():
        if isinstance(module, Fp8Linear):
            module.activations = None  # the dequantized path, activations as they are
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=512))
    assert any(key[3] == torch.float8_e4m3fn for key in kernels._gemv_plan), "no FP8 shape was tuned"
    head_dtypes = {key[3] for key in kernels._gemv_plan if key[0] == model.config.vocab_size}
    assert head_dtypes <= {torch.float8_e4m3fn if head else torch.bfloat16}, head_dtypes
    prompts = [prompt(n, n) for n in (5, 40)]
    for ids, got in zip(prompts, engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))):
        near_best = []
        for ref in (reference, weight_only):
            with torch.inference_mode():
                logits = ref(torch.tensor([ids + got], device="cuda"), use_cache=False).logits[0].float()
            steps = logits[len(ids) - 1:-1]  # the logits each generated token was chosen from
            picked = steps.gather(1, torch.tensor(got, device="cuda")[:, None])[:, 0]
            best = steps.max(dim=1).values
            near_best.append((best - picked) / (best - steps.min(dim=1).values))
        assert bool((torch.minimum(*near_best) <= 0.05).all()), (got, near_best)


@pytest.mark.parametrize("m", [1, 5, 64])
def test_norms_write_the_fp8_rows_quantize_rows_would(m):
    """With ``quantize`` the RMSNorm and add + RMSNorm launches also write their output's FP8 rows: byte for byte
    what quantize_rows_fp8 makes of that output (an all-zero row included), the output unchanged."""
    from telechat.model.kernels import FP8_MIN_SCALE, fp8_rows, quantize_rows_fp8, rms_norm

    torch.manual_seed(0)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    if m > 1:
        x[1], r[1] = 0, 0
    with torch.inference_mode():  # the Triton kernels serve inference only
        cases = {"rms_norm": (rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5, quantize=True)),
                 "add_rms_norm": (fused_add_rms_norm(x, r, w, 1e-5)[0],
                                  fused_add_rms_norm(x, r, w, 1e-5, quantize=True)[0])}
    for name, (plain, fused) in cases.items():
        assert fp8_rows(plain) is None and torch.equal(plain, fused), name
        q, scale = fp8_rows(fused)
        q_ref, scale_ref = quantize_rows_fp8(plain, None, FP8_MIN_SCALE)
        assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), name


@pytest.mark.parametrize("plan, rows", [("scaled_mm", 1), ("scaled_mm", 5), ("dot8", 1), ("dot8", 5), ("fma", 1)])
def test_fp8_blocks_take_their_inputs_quantized_by_the_norms(plan, rows):
    """After fuse_projections an FP8 model's norms hand their FP8 rows to qkv and gate_up when those compute with
    x quantized (``_scaled_mm``, no GEMV plan; a ``dot8`` plan) and not for a weight-only FMA plan; dense and
    down_proj quantize their inputs themselves. forward_batch gives the very numbers it gives with that off."""
    from telechat.model.forward_batch import CausalAttention, ForwardBatch
    from telechat.model.kernels import fp8_rows
    from telechat.model.rope import inv_freq

    model = _fp8_model()
    model.fuse_projections()
    block = model.transformer.h[0]
    attn, mlp = block.self_attention, block.mlp
    assert block.input_layernorm.fp8_readers == (attn.qkv,) and block.post_attention_layernorm.fp8_readers == (mlp.gate_up,)
    assert attn.qkv.fp8_rows_in and not attn.dense.fp8_rows_in and not mlp.down_proj.fp8_rows_in
    kernels._gemv_plan.clear()
    configs = {"dot8": GemvConfig(64, 256, kind="dot8", num_stages=3), "fma": GemvConfig(8, 512, num_stages=3)}
    if plan in configs:
        for layer in (attn.qkv, attn.dense, mlp.gate_up, mlp.down_proj):
            kernels._gemv_plan[kernels._plan_key(layer, rows)] = configs[plan]
    ids = torch.randint(0, model.config.vocab_size, (rows,), device="cuda")
    rope = model.rope_params(rows)
    batch = ForwardBatch(positions=torch.arange(rows, device="cuda"), mscale=torch.full((rows,), rope.mscale, device="cuda"),
                         inv_freq=inv_freq(rope.base, model.config.head_dim).to("cuda").expand(rows, -1),
                         attention=CausalAttention())
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        normed, _ = block.post_attention_layernorm.add_forward(x, x)
        fused = model.transformer.forward_batch(ids, batch)
        for module in model.modules():
            if hasattr(module, "fp8_readers"):
                module.fp8_readers = ()
        plain = model.transformer.forward_batch(ids, batch)
    kernels._gemv_plan.clear()
    assert (fp8_rows(normed) is not None) == (plan != "fma")
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m, k", [(1, 4096), (64, 12288), (3, 100)])
def test_fused_activation_quantization_equals_the_pytorch_formula(m, k, static):
    """One-launch per-token (or static) FP8 activation quantization gives the PyTorch formula's bytes."""
    from telechat.model.kernels import FP8_MIN_SCALE, quantize_rows_fp8

    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    x[0] = 0  # an all-zero token: the scale floor, zeros out
    static_scale = torch.tensor([0.01], device="cuda") if static else None
    q, scale = quantize_rows_fp8(x, static_scale, FP8_MIN_SCALE)
    if static:
        ref_scale = static_scale.expand(m, 1)
    else:
        ref_scale = (x.abs().amax(dim=-1, keepdim=True).float() / 448.0).clamp_min(FP8_MIN_SCALE)
    ref_q = (x.float() / ref_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_short_and_long_chunks_over_cached_context_match_generate_fp32():
    """One step with chunks continuing cached context on both paths — short ones attended straight from the
    cache by the prefix kernel, a long one (over ``PREFIX_KERNEL_TOKENS`` new tokens) read back for SDPA —
    gives generate()'s logits and tokens for each."""
    from telechat.engine.kv_cache import PREFIX_KERNEL_TOKENS

    # one rotary scale for every length here (no NTK scaling below training_seqlen): the shared blocks were
    # computed for the 128-token prompt
    model = _model(torch.float32, hidden_size=640, num_key_value_heads=2, training_seqlen=1024)
    s = Steps(model, block_size=16, max_model_len=512)
    base = prompt(128, 40)
    first = s.request(base)
    s.run(prefills=[s.chunk(first, 0, 128)], new=[first])
    long_new = PREFIX_KERNEL_TOKENS + 40
    hits = [s.request(base[:112] + prompt(n, 60 + n), shared_blocks=first.block_ids[:7]) for n in (8, long_new, 30)]
    s.run(prefills=[s.chunk(r, 112, len(r.prompt_ids)) for r in hits], new=hits)
    for i, r in enumerate(hits):
        tokens, logits = hf_generate(model, r.prompt_ids, 1)
        assert r.output_ids == tokens
        torch.testing.assert_close(s.last_logits[i], logits[0], rtol=1e-3, atol=1e-3)


def test_cached_context_burst_matches_generate_fp32():
    """A burst of prompts served from the prefix cache at one span (112 of 128 tokens cached, as in the
    constrained-decoding bench) is attended over the context read back from the cache — on CUDA by the prefix
    prefill kernel, one launch per layer (fp32 at full precision, grouped-query heads, head dim 160 like the
    12B): generate()'s logits and tokens."""
    model = _model(torch.float32, hidden_size=640, num_key_value_heads=2)
    s = Steps(model, block_size=16)
    base = prompt(128, 40)
    first = s.request(base)
    s.run(prefills=[s.chunk(first, 0, 128)], new=[first])
    hits = [s.request(base[:112] + prompt(16, 41 + i), shared_blocks=first.block_ids[:7]) for i in range(6)]
    s.run(prefills=[s.chunk(r, 112, 128) for r in hits], new=hits)
    for i, r in enumerate(hits):
        tokens, logits = hf_generate(model, r.prompt_ids, 1)
        assert r.output_ids == tokens
        torch.testing.assert_close(s.last_logits[i], logits[0], rtol=1e-3, atol=1e-3)


def test_mixed_steps_launch_without_waiting_for_the_device():
    """Steps mixing decodes, chunks over cached context and fresh prompts of one length at rows apart (an index,
    not a slice) are staged and launched without a synchronizing CUDA call — host to device copies go through
    pinned memory — so the host prepares step N+1 while the device runs step N (with a blocking copy, every
    such step waited for the previous one: bench/RESULTS.md, session 8). Reading a step's tokens waits on its
    own event, which the sync debug mode does not count."""
    from telechat.engine.core import EngineConfig, LLMEngine
    from telechat.engine.sampling import SamplingParams

    model = _model(torch.bfloat16, training_seqlen=1024)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_model_len=512))
    base = prompt(128, 7)
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.generate([base], greedy)
    engine.add_request(prompt(20, 8), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    later = [engine.add_request(ids, greedy) for ids in (prompt(17, 9), base + prompt(16, 10), prompt(17, 11))]
    first: dict[str, list[int]] = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            for out in engine.step():
                first.setdefault(out.request_id, out.new_token_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(first.get(r) for r in later), first
    assert engine.scheduler.pool.hits >= 128
