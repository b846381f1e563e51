"""Serving-time fusions (fused projections, add + RMSNorm, SwiGLU on halves) and the forward_batch seam,
against the unfused transformers path (CPU, float32)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from telechat.model.config import TelechatConfig
from telechat.model.forward_batch import CausalAttention, ForwardBatch
from telechat.model import kernels
from telechat.model.kernels import GEMV_CANDIDATES, fused_add_rms_norm, gemv, rms_norm_reference, silu_mul, swiglu
from telechat.model.modeling import TelechatForCausalLM
from telechat.model.rope import inv_freq

VARIANTS = {"mha": {}, "gqa": {"num_key_value_heads": 2}, "embed-layernorm": {"embed_layernorm": True},
            "post-ln-residual": {"apply_residual_connection_post_layernorm": True}}


def make(seed: int = 0, **kw) -> TelechatForCausalLM:
    torch.manual_seed(seed)
    cfg = TelechatConfig(**{**dict(vocab_size=300, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=96,
                                   training_seqlen=16, seq_length=256, initializer_range=0.2), **kw})
    model = TelechatForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def one_sequence(model: TelechatForCausalLM, n: int, rows: list[int] | None = None) -> ForwardBatch:
    """A ForwardBatch for one fresh sequence of ``n`` tokens (RoPE fixed at its length)."""
    rope = model.rope_params(n)
    return ForwardBatch(positions=torch.arange(n), inv_freq=inv_freq(rope.base, model.config.head_dim).expand(n, -1),
                        mscale=torch.full((n,), rope.mscale), attention=CausalAttention(),
                        logits_rows=None if rows is None else torch.tensor(rows))


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_fused_projections_give_the_unfused_logits(kw):
    """fuse_projections() (twice: idempotent) leaves the logits of forward and forward_batch unchanged."""
    model = make(**kw)
    ids = torch.randint(0, 300, (1, 30))  # past training_seqlen: NTK base and mscale active
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    fused.fuse_projections()
    with torch.inference_mode():
        ref = model(ids, use_cache=False).logits[0]
        torch.testing.assert_close(fused(ids, use_cache=False).logits[0], ref, rtol=1e-5, atol=1e-5)
        for m in (model, fused):
            torch.testing.assert_close(m.forward_batch(ids[0], one_sequence(m, 30)), ref, rtol=1e-5, atol=1e-5)
        picked = fused.forward_batch(ids[0], one_sequence(fused, 30, rows=[29, 3]))
    torch.testing.assert_close(picked, ref[[29, 3]], rtol=1e-5, atol=1e-5)
    names = {n for n, _ in fused.named_parameters()}
    assert "transformer.h.1.self_attention.qkv.weight" in names and "transformer.h.1.mlp.gate_up.weight" in names
    assert not any(k in n for n in names for k in ("query", "key_value", "gate_proj", "up_proj"))


def test_fused_qkv_rows_are_q_then_k_then_v_heads():
    """The qkv weight holds every q head, then K of every kv head, then V (the official key_value
    rows are interleaved per head)."""
    model = make(num_key_value_heads=2)
    attn = model.transformer.h[0].self_attention
    query, key_value = attn.query.weight.detach().clone(), attn.key_value.weight.detach().clone()
    attn.fuse()
    d = attn.head_dim
    w = attn.qkv.weight.detach()
    assert torch.equal(w[: 4 * d], query)
    for h in range(2):
        assert torch.equal(w[4 * d + h * d : 4 * d + (h + 1) * d], key_value[2 * d * h : 2 * d * h + d])
        assert torch.equal(w[6 * d + h * d : 6 * d + (h + 1) * d], key_value[2 * d * h + d : 2 * d * (h + 1)])


def test_only_plain_linears_fuse():
    """A projection that is not exactly nn.Linear (a quantized or wrapped layer) stays unfused; the rest
    fuses and the logits stay the same."""
    model = make()
    attn = model.transformer.h[0].self_attention
    other = nn.modules.linear.NonDynamicallyQuantizableLinear(64, 64, bias=False)  # a torch subclass of nn.Linear
    other.weight = attn.query.weight
    attn.query = other
    ids = torch.randint(0, 300, (1, 12))
    with torch.inference_mode():
        ref = model(ids, use_cache=False).logits
        model.fuse_projections()
        out = model(ids, use_cache=False).logits
    assert attn.qkv is None and attn.query is other
    assert model.transformer.h[0].mlp.gate_up is not None and model.transformer.h[1].self_attention.qkv is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_never_fused_model_keeps_the_hf_path():
    """A model that was never fused keeps the official parameter names, and its generate() equals a
    fused copy's (both run the transformers path)."""
    model = make()
    official = set(model.state_dict())
    assert "transformer.h.0.self_attention.key_value.weight" in official
    assert "transformer.h.0.mlp.gate_proj.weight" in official
    ids = torch.randint(0, 300, (1, 9))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, eos_token_id=None)
    before = model.generate(ids, **kw)
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    assert torch.equal(fused.generate(ids, **kw), before)
    assert torch.equal(model.generate(ids, **kw), before) and set(model.state_dict()) == official


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_equals_add_then_norm(dtype):
    """fused_add_rms_norm returns (rms_norm(x + residual), x + residual) with the eager numerics."""
    x, r = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype)
    w = torch.randn(64, dtype=dtype)
    normed, h = fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, x + r)
    assert torch.equal(normed, rms_norm_reference(x + r, w, 1e-5))


@pytest.mark.parametrize("kw", [{}, {"apply_residual_connection_post_layernorm": True}], ids=["pre-ln", "post-ln"])
def test_block_forward_batch_sums_to_forward(kw):
    """A block's serving form returns (mlp_out, residual) whose sum is its forward output, with the
    residual add of the previous block folded into its first norm."""
    model = make(**kw)
    block = model.transformer.h[0]
    x, prev = torch.randn(10, 64), torch.randn(10, 64)
    cos, sin = model.transformer.rotary.tables(torch.arange(10), 10, torch.float32)
    with torch.inference_mode():
        ref = block((x + prev)[None], cos[None], sin[None])[0]  # the transformers path takes [B, T, H]
        out, residual = block.forward_batch(x, prev, cos, sin, CausalAttention())
    torch.testing.assert_close(out + residual, ref, rtol=1e-5, atol=1e-5)


def test_swiglu_on_halves_equals_silu_mul():
    """swiglu([gate | up]) == silu(gate) * up."""
    gate_up = torch.randn(3, 7, 40)
    assert torch.equal(swiglu(gate_up), silu_mul(gate_up[..., :20], gate_up[..., 20:]))


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton GEMV on CPU in Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_gemv_tiling_equals_linear_in_the_triton_interpreter(dtype):
    """Each GEMV candidate (FMA, tensor-core and swap-AB tiles, split-K reduced by a second launch or by
    the last program) equals F.linear for 1, 3 and 8 rows with uneven N and K and a bias, and with a K of
    one tile (splits past K read nothing), twice in a row (the serial split-K's counters are back at zero
    after each call)."""
    torch.manual_seed(0)
    for n, k in ((200, 1000), (200, 512)):
        w = torch.randn(n, k, dtype=dtype) * 0.05
        b = torch.randn(n, dtype=dtype)
        for m in (1, 3, 8):
            x = torch.randn(m, k, dtype=dtype)
            ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
            for config in GEMV_CANDIDATES:
                if m <= config.max_m and config.kind != "dot8":  # FP8 tensor cores: CUDA only (tests/engine)
                    for _ in range(2):
                        out = gemv(x, w, b, config).float()
                        assert (out - ref).norm() / ref.norm() < 1e-2, (config, m, k)
    assert all(int(c.count_nonzero()) == 0 for c in kernels._arrival_counters.values())
