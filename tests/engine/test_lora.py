"""Per-request LoRA adapters (docs/engine.md, Batched LoRA) on a tiny random model (CPU).

The reference everywhere is PEFT's own merge (``merge_and_unload``) of the same adapter folder into an
unfused copy of the model: the batched path (fused ``qkv`` / ``gate_up``, masked slot GEMMs, slots
loaded and evicted by the scheduler) must give the same logits and the same greedy tokens.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os

import pytest
import torch

from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.request import Request
from telechat.engine.sampling import SamplingParams
from telechat.engine.scheduler import Scheduler, SchedulerConfig
from telechat.engine.scheduler_output import SchedulerOutput
from telechat.model import kernels
from telechat.model.config import TelechatConfig
from telechat.model.forward_batch import CausalAttention, ForwardBatch
from telechat.model.lora import AdapterError, LoraAdapter, LoraSlots
from telechat.model.modeling import TelechatForCausalLM
from telechat.model.rope import inv_freq

VOCAB = 300
TARGETS = ["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model() -> TelechatForCausalLM:
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, num_key_value_heads=2,
                         ffn_hidden_size=96, training_seqlen=64, seq_length=256, initializer_range=0.3)
    return TelechatForCausalLM(cfg).eval()


def make_adapter(model, folder, seed: int, r: int = 4, targets=TARGETS, **extra):
    """A PEFT adapter folder with random non-zero A and B (it really changes the model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                                 init_lora_weights=False, **extra))
    with torch.no_grad():  # large enough to move the greedy tokens of this random model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    return folder


def merged(model, folder) -> TelechatForCausalLM:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).merge_and_unload().eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(model, root / "a", 1), "b": make_adapter(model, root / "b", 2, r=8,
                                                                      targets=["query", "key_value", "up_proj"])}


def _forward(m, ids: list[int], lora=None) -> torch.Tensor:
    """Logits of one fresh sequence through ``forward_batch`` (reference attention, no cache)."""
    n = len(ids)
    rope = m.rope_params(n)
    positions = torch.arange(n)
    batch = ForwardBatch(positions=positions, inv_freq=inv_freq(rope.base, m.config.head_dim).expand(n, -1),
                         mscale=torch.full((n,), rope.mscale), attention=CausalAttention(), lora=lora)
    with torch.inference_mode():
        return m.forward_batch(torch.tensor(ids), batch)


def test_slot_matmul_equals_the_merged_weights(model, adapters):
    """Each slot's rows give the logits of the model with that adapter merged by PEFT; slot -1 the base's;
    the fused qkv / gate_up columns get the LoRA of query / key_value and gate_proj / up_proj."""
    from telechat.model.lora import read_adapter

    served = copy.deepcopy(model)
    served.fuse_projections()
    slots = LoraSlots(served, max_loras=3, max_rank=8)
    for slot, name in ((2, "a"), (0, "b")):
        slots.load(slot, read_adapter(adapters[name], name, served, 8))
    ids = prompt(20, 0)
    for slot, ref in ((2, merged(model, adapters["a"])), (0, merged(model, adapters["b"])), (-1, model)):
        got = _forward(served, ids, slots.batch(torch.full((len(ids),), slot)))
        want = _forward(ref, ids)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), slot
    assert not torch.allclose(_forward(model, ids), _forward(merged(model, adapters["b"]), ids), atol=1e-2)


def _engine(model, adapters, max_loras: int) -> LLMEngine:
    engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_num_seqs=8, block_size=4, max_loras=max_loras,
                                                          max_lora_rank=8, kv_cache_memory=4 << 20))
    for name, folder in adapters.items():
        engine.load_adapter(name, str(folder))
    return engine


def _run(engine: LLMEngine, requests: list[tuple[list[int], str | None]], check=None) -> list[list[int]]:
    ids = [engine.add_request(p, GREEDY, lora=lora) for p, lora in requests]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            out[o.request_id] += o.new_token_ids
        if check:
            check(engine)
    return [out[i] for i in ids]


def test_two_adapters_and_the_base_in_one_batch_match_each_merged_model(model, adapters):
    """Greedy tokens of base, a and b requests batched together equal each one served alone by its merged model."""
    prompts = [prompt(9, 1), prompt(17, 2), prompt(5, 3), prompt(12, 4)]
    names = [None, "a", "b", "a"]
    want = []
    for p, name in zip(prompts, names):
        ref = model if name is None else merged(model, adapters[name])
        want.append(LLMEngine(copy.deepcopy(ref), EngineConfig(max_num_seqs=2, block_size=4,
                                                               kv_cache_memory=4 << 20)).generate([p], GREEDY)[0])
    assert len({tuple(w) for w in want[:3]}) == 3, "the adapters should change the tokens"
    engine = _engine(model, adapters, max_loras=2)
    steps_with_both = []

    def check(e):
        steps_with_both.append(e.scheduler.lora_slots.in_use)

    assert _run(engine, list(zip(prompts, names)), check) == want
    assert max(steps_with_both) == 2


def test_padded_decode_buckets_with_and_without_adapter_rows(model, adapters):
    """Decode steps bucketed and padded as CUDA graphs run them (the padding rows use slot -1), with adapter
    rows and with none (the pass without the LoRA path), give the unpadded engine's tokens."""
    requests = [(prompt(9, 31), "a"), (prompt(6, 32), None), (prompt(13, 33), "b")]
    plain = _engine(model, adapters, max_loras=2)
    padded = _engine(model, adapters, max_loras=2)
    padded.runner.graphs = {}  # bucketed shapes as on CUDA, run eagerly (no capture on CPU)
    for batch in (requests, [requests[1]]):
        assert _run(padded, batch) == _run(plain, batch)


def test_more_adapters_than_slots_wait_for_a_slot_and_reload(model, adapters):
    """With one slot, requests for two adapters never run together; each still gets its own adapter's
    tokens (the slot is reloaded), and the base request runs alongside either."""
    engine = _engine(model, adapters, max_loras=1)
    in_use = []

    def check(e):
        in_use.append(len({r.lora.id for r in e.scheduler.running if r.lora is not None}))

    requests = [(prompt(8, 5), "a"), (prompt(8, 6), "b"), (prompt(8, 7), None), (prompt(6, 8), "a")]
    got = _run(engine, requests, check)
    assert max(in_use) == 1
    for (p, name), tokens in zip(requests, got):
        ref = model if name is None else merged(model, adapters[name])
        assert tokens == LLMEngine(copy.deepcopy(ref), EngineConfig(max_num_seqs=2, block_size=4,
                                                                    kv_cache_memory=4 << 20)).generate([p], GREEDY)[0]


def test_prefix_cache_keeps_adapters_apart(model, adapters):
    """The same prompt under the base and under an adapter is not served from each other's cached KV."""
    engine = _engine(model, adapters, max_loras=2)
    p = prompt(24, 9)
    base = _run(engine, [(p, None)])[0]
    with_a = _run(engine, [(p, "a")])[0]
    assert with_a == merged_tokens(model, adapters["a"], p)
    assert _run(engine, [(p, None)])[0] == base


def merged_tokens(model, folder, p: list[int]) -> list[int]:
    return LLMEngine(merged(model, folder), EngineConfig(max_num_seqs=2, block_size=4,
                                                        kv_cache_memory=4 << 20)).generate([p], GREEDY)[0]


def test_unload_and_names(model, adapters):
    """A loaded name cannot be loaded again; an unloaded one cannot be requested; unknown names fail."""
    engine = _engine(model, adapters, max_loras=1)
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("a", str(adapters["b"]))
    engine.unload_adapter("a")
    with pytest.raises(ValueError, match="no LoRA adapter named 'a'"):
        engine.add_request([5, 6], GREEDY, lora="a")
    with pytest.raises(KeyError):
        engine.unload_adapter("a")


def test_bad_adapter_folders(model, adapters, tmp_path):
    """Missing folder, a folder without adapter_config.json, a rank above max_lora_rank and a target the
    model lacks are refused with a message saying which."""
    engine = _engine(model, {}, max_loras=1)
    with pytest.raises(AdapterError, match="does not exist"):
        engine.load_adapter("x", str(tmp_path / "nowhere"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        engine.load_adapter("x", str(tmp_path / "plain"))
    big = make_adapter(model, tmp_path / "big", 3, r=16)
    with pytest.raises(AdapterError, match="rank 16, above .* max_lora_rank 8"):
        engine.load_adapter("x", str(big))
    odd = tmp_path / "odd"
    make_adapter(model, odd, 4)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query", "lm_head"]
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lacks: lm_head"):
        engine.load_adapter("x", str(odd))
    assert engine.adapters == {}
    off = LLMEngine(copy.deepcopy(model), EngineConfig(max_num_seqs=2, block_size=4, kv_cache_memory=4 << 20))
    with pytest.raises(AdapterError, match="max_loras is 0"):
        off.load_adapter("a", str(adapters["a"]))


# ---------------------------------------------------------------------------------------------- scheduler only

def test_scheduler_admits_no_more_distinct_adapters_than_slots():
    """Pure scheduler: with 2 slots and requests for 3 adapters, the third adapter's request waits, and so do
    adapter requests behind it (the slots drain), while a base request behind it is admitted; freed slots are
    reloaded least recently used first; a slot that still holds the adapter asked for is not reloaded."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_blocks=64,
                                      max_model_len=64, max_loras=2))
    x, y, z = (LoraAdapter(name, "", 4, {}, id=i) for i, name in enumerate("xyz", 1))
    params = SamplingParams(max_tokens=2, temperature=0)

    def add(rid: str, adapter):
        sched.add_request(Request(rid, [1, 2, 3], params, max_len=64, lora=adapter))

    def step() -> SchedulerOutput:
        out = sched.schedule()
        sched.update_from_output(out, [7] * len(out.sampled))
        return out

    for rid, adapter in (("x1", x), ("y1", y), ("z1", z), ("base", None), ("x2", x)):
        add(rid, adapter)
    out = step()
    assert [c.request.request_id for c in out.prefills] == ["x1", "y1", "base"]
    assert [(slot, a.name) for slot, a in out.lora_loads] == [(0, "x"), (1, "y")]
    out = step()  # decodes; x1, y1 and base finish (max_tokens 2), z1 and x2 still wait
    assert out.prefills == [] and set(sched.requests) == {"z1", "x2"}
    out = step()
    assert [c.request.request_id for c in out.prefills] == ["z1", "x2"]
    assert [(slot, a.name) for slot, a in out.lora_loads] == [(0, "z"), (1, "x")]  # x's old slot 0 went first
    add("x3", x)
    out = step()
    assert out.lora_loads == [] and sched.requests["x3"].lora_slot == 1  # joins x2 in slot 1
    step()
    step()
    assert not sched.requests and sched.lora_slots.in_use == 0
    add("z2", z)
    out = step()
    assert out.lora_loads == [] and out.prefills[0].request.lora_slot == 0  # z is still in slot 0


def test_in_process_engine_loads_uses_and_unloads(model, adapters):
    """The asyncio face over an in-process engine (AsyncEngine, the same CoreLoop as the core process):
    load, generate with the adapter, refuse a second load of the name, unload, refuse an unknown unload."""
    from telechat.engine.async_engine import AsyncEngine

    front = AsyncEngine(_engine(model, {}, max_loras=1))
    p = prompt(10, 11)

    async def run() -> list[int]:
        await front.load_lora_adapter("a", str(adapters["a"]))
        tokens = [t async for out in front.generate(p, GREEDY, lora="a") for t in out.new_token_ids]
        with pytest.raises(ValueError, match="already loaded"):
            await front.load_lora_adapter("a", str(adapters["b"]))
        await front.unload_lora_adapter("a")
        with pytest.raises(KeyError):
            await front.unload_lora_adapter("a")
        return tokens

    try:
        tokens = asyncio.run(run())
    finally:
        front.shutdown(0)
    assert tokens == merged_tokens(model, adapters["a"], p)
    assert front.lora_adapters == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_with_two_adapters_equals_eager(model, adapters):
    """On CUDA, decode steps replayed from graphs (slot ids read from the fixed-address row buffer) give
    the tokens of eager decode steps and of each merged model, with two adapters and the base batched."""
    requests = [(prompt(9, 21), "a"), (prompt(14, 22), None), (prompt(7, 23), "b"), (prompt(11, 24), "a")]
    base_only = (prompt(10, 25), None)

    def run(cuda_graphs: bool) -> list[list[int]]:
        engine = LLMEngine(copy.deepcopy(model).cuda(), EngineConfig(
            max_num_seqs=8, block_size=16, max_loras=2, max_lora_rank=8, kv_cache_memory=64 << 20,
            cuda_graphs=cuda_graphs))
        for name, folder in adapters.items():
            engine.load_adapter(name, str(folder))
        assert (engine.runner.graphs is not None) == cuda_graphs
        mixed = _run(engine, requests)
        return mixed + _run(engine, [base_only])  # decode steps with no adapter row: the graphs without LoRA

    graphed = run(True)
    assert graphed == run(False)
    for (p, name), tokens in zip(requests + [base_only], graphed):
        ref = model if name is None else merged(model, adapters[name])
        want = LLMEngine(copy.deepcopy(ref).cuda(), EngineConfig(max_num_seqs=2, block_size=16,
                                                                 kv_cache_memory=64 << 20)).generate([p], GREEDY)[0]
        assert tokens == want, name


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton LoRA kernels on CPU in Triton's interpreter (TRITON_INTERPRET=1)")
def test_per_row_kernels_equal_the_masked_gemms_in_the_triton_interpreter():
    """lora_rows (shrink + expand, each row reading its own slot) adds what the masked GEMMs add: three slots
    of width 40 (uneven blocks), K split unevenly, rows of every slot and of the base (-1, left unchanged)."""
    _rows_vs_masked(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_per_row_kernels_equal_the_masked_gemms_on_cuda():
    """The same check with the compiled kernels, bf16 and float32."""
    _rows_vs_masked(torch.device("cuda"))
    _rows_vs_masked(torch.device("cuda"), torch.bfloat16)


def _rows_vs_masked(device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    from telechat.model.lora import LoraBatch
    from telechat.model.lora_kernels import lora_rows

    torch.manual_seed(0)
    slots_n, rank, parts, k, n = 3, 20, 2, 1100, 200  # K over three uneven shrink slices
    layer = torch.nn.Linear(k, n, bias=False).to(device, dtype)
    layer.lora_a = (torch.randn(slots_n * parts * rank, k) * 0.1).to(device, dtype)
    layer.lora_b = (torch.randn(n, slots_n * parts * rank) * 0.1).to(device, dtype)
    layer.lora_parts = parts
    slots = torch.tensor([2, -1, 0, 1, 2, -1, 0], device=device)
    x = torch.randn(len(slots), k, device=device, dtype=dtype)
    base = layer(x)
    want = base.float() + ((x.float() @ layer.lora_a.float().t())
                           * LoraBatch(slots, slots_n, rank)._mask(parts, torch.float32)) @ layer.lora_b.float().t()
    got = lora_rows(base.clone(), x, layer.lora_a, layer.lora_b, slots, parts * rank).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    assert torch.equal(got[slots == -1], base[slots == -1].float())
