"""Continuous-batching engine invariants on a tiny random model (CPU)."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch

from telechat.model.config import TelechatConfig
from telechat.engine.async_engine import AsyncEngine
from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.kv_cache import PREFIX_KERNEL_TOKENS
from telechat.engine.sampling import SamplingParams
from telechat.model.modeling import TelechatForCausalLM

VOCAB = 400
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def model() -> TelechatForCausalLM:
    torch.manual_seed(0)
    # A large init spreads the logits, so greedy ties (which batching could flip) do not occur.
    cfg = TelechatConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=128,
                         training_seqlen=48, seq_length=512, initializer_range=0.3)
    return TelechatForCausalLM(cfg).eval()


def prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=None,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def drained(eng: LLMEngine) -> bool:
    """Nothing left running and every KV block back in the pool."""
    s = eng.stats()
    return not eng.has_unfinished() and s["running"] == 0 and s["kv_usage"] == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_engine_matches_transformers_generate(model, overlap):
    """Engine greedy output equals transformers generate() on our model, including past training_seqlen,
    with tokens read in the same step or one step later (host/device overlap)."""
    ps = prompts(3, seed=1, lo=30, hi=70)
    out = LLMEngine(model, EngineConfig(max_num_seqs=4, overlap=overlap)).generate(ps, GREEDY)
    assert out == [hf_greedy(model, p, GREEDY.max_tokens) for p in ps]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_batched_equals_alone(model, overlap):
    """16 requests batched together produce exactly what each produces alone."""
    ps = prompts(16, seed=2)
    alone = [LLMEngine(model, EngineConfig(max_num_seqs=1)).generate([p], GREEDY)[0] for p in ps]
    together = LLMEngine(model, EngineConfig(max_num_seqs=16, overlap=overlap)).generate(ps, GREEDY)
    assert together == alone


def test_chunked_prefill_equals_one_shot(model):
    """Long prompts split into small prefill chunks give the same output as one-shot prefill."""
    ps = prompts(4, seed=3, lo=80, hi=120)
    one = LLMEngine(model, EngineConfig(max_num_batched_tokens=4096)).generate(ps, GREEDY)
    chunked = LLMEngine(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=17, block_size=4)).generate(ps, GREEDY)
    assert chunked == one


def test_preemption_under_tiny_cache_keeps_outputs(model):
    """With a KV budget far below demand, sequences are preempted and recomputed without changing output."""
    ps = prompts(8, seed=4, lo=20, hi=40)
    ref = LLMEngine(model, EngineConfig(max_num_seqs=8)).generate(ps, GREEDY)
    per_token = 2 * 2 * 4 * 16 * 4  # K+V × layers × heads × head_dim × fp32 bytes
    small = LLMEngine(model, EngineConfig(max_num_seqs=8, block_size=4, kv_cache_memory=per_token * 4 * 30))
    assert small.capacity_tokens == 120
    assert small.generate(ps, GREEDY) == ref
    assert small.stats()["preemptions"] > 0
    assert drained(small)


def test_abort_frees_blocks_at_next_step(model):
    """An aborted request finishes with reason 'abort' and returns its KV blocks."""
    eng = LLMEngine(model)
    rid = eng.add_request(prompts(1)[0], SamplingParams(max_tokens=100, temperature=0))
    eng.step()
    assert eng.stats()["kv_usage"] > 0
    eng.abort(rid)
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "abort")]
    assert drained(eng)


def test_stop_tokens_and_lengths(model):
    """A stop token ends with 'stop'; max_tokens and max_model_len end with 'length'."""
    p = prompts(1, seed=5)[0]
    free_run = LLMEngine(model).generate([p], GREEDY)[0]
    stop_tok = free_run[5]
    eng = LLMEngine(model)
    eng.add_request(p, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_tok]))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    final = [o for o in outs if o.finished][0]
    assert final.finish_reason == "stop" and final.num_output_tokens == free_run.index(stop_tok) + 1
    short = LLMEngine(model, EngineConfig(max_model_len=len(p) + 3))
    assert len(short.generate([p], GREEDY)[0]) == 3
    with pytest.raises(ValueError, match="context"):
        short.add_request(list(range(4, 4 + len(p) + 3)), GREEDY)


def test_seeded_sampling_is_reproducible(model):
    """Same seed → same tokens, in any batch; different seeds → different tokens."""
    ps = prompts(3, seed=6)
    sp = lambda s: SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2,
                                  seed=s)  # noqa: E731
    eng = LLMEngine(model)
    a = eng.generate(ps, [sp(1), sp(2), sp(3)])
    b = eng.generate(ps[::-1], [sp(3), sp(2), sp(1)])[::-1]
    assert a == b
    assert eng.generate([ps[0]], sp(99))[0] != a[0]


def test_sampling_respects_top_k_one_and_penalty(model):
    """top_k=1 equals greedy; a repetition penalty changes a repetitive greedy continuation."""
    p = prompts(1, seed=7)[0]
    eng = LLMEngine(model)
    greedy = eng.generate([p], GREEDY)[0]
    assert eng.generate([p], SamplingParams(max_tokens=24, temperature=0.7, top_k=1, seed=3))[0] == greedy
    penalised = eng.generate([p], SamplingParams(max_tokens=24, temperature=0, repetition_penalty=5.0))[0]
    assert penalised != greedy


def test_async_engine_streams_and_aborts(model):
    """Concurrent coroutines stream their own tokens; leaving a stream early aborts that request only."""
    ps = prompts(4, seed=8)
    expected = LLMEngine(model).generate(ps, GREEDY)
    engine = AsyncEngine(LLMEngine(model))

    async def collect(p):
        toks = []
        async for out in engine.generate(p, GREEDY):
            toks += out.new_token_ids
        return toks

    async def leave_early(p):
        async for out in engine.generate(p, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)):
            if out.num_output_tokens >= 3:
                break

    async def main():
        return await asyncio.gather(*(collect(p) for p in ps), leave_early(ps[0]))

    try:
        results = asyncio.run(main())
        assert results[:4] == expected
        for _ in range(100):
            if not engine.engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.02))
        assert drained(engine.engine)
    finally:
        engine.shutdown(grace_s=0)


def test_bucket_padding_matches_exact_batches(model):
    """Decode batches padded to a graph bucket (padding rows write to the scratch block) change nothing."""
    ps = prompts(5, seed=9)
    exact = LLMEngine(model, EngineConfig(max_num_seqs=8)).generate(ps, GREEDY)
    padded = LLMEngine(model, EngineConfig(max_num_seqs=8))
    padded.runner.graphs = {}  # bucketed shapes as on CUDA, run eagerly (no capture on CPU)
    assert padded.generate(ps, GREEDY) == exact


def _run_all(eng: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], str, str]]:
    """Add every request, step to the end; request id → (tokens, finish reason, error)."""
    ids = [eng.add_request(p, sp) for p, sp in requests]
    toks: dict[str, list[int]] = {i: [] for i in ids}
    final: dict[str, tuple[str, str]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            toks[out.request_id] += out.new_token_ids
            if out.finished:
                final[out.request_id] = (out.finish_reason, out.error)
    return {i: (toks[i], *final[i]) for i in ids}


@pytest.mark.parametrize("poison", [
    SamplingParams(max_tokens=24, temperature=1e-300),  # logits / 1e-300 = inf → NaN probabilities
    SamplingParams(max_tokens=24, temperature=1.0, repetition_penalty=5e-324),  # logit / 5e-324 = inf
    SamplingParams(max_tokens=24, temperature=0, repetition_penalty=5e-324),  # the same, greedy
], ids=["tiny-temperature", "tiny-penalty-sampled", "tiny-penalty-greedy"])
def test_poisoned_request_fails_alone(model, poison):
    """A request whose sampling numbers go bad ends with an error; its 8 batch-mates are untouched."""
    ps = prompts(9, seed=10)
    alone = LLMEngine(model, EngineConfig(max_num_seqs=8)).generate(ps[:8], GREEDY)
    eng = LLMEngine(model, EngineConfig(max_num_seqs=9))
    results = _run_all(eng, [(p, GREEDY) for p in ps[:8]] + [(ps[8], poison)])
    outcomes = list(results.values())
    assert [o[0] for o in outcomes[:8]] == alone
    assert all(o[1] in ("stop", "length") and o[2] is None for o in outcomes[:8])
    assert outcomes[8][1] == "error" and "not finite" in outcomes[8][2]
    assert drained(eng)


def test_extreme_but_valid_values_sample_normally(model):
    """top_p that rounds to 0 keeps the most likely token (= greedy); top_k beyond the vocabulary keeps all."""
    p = prompts(1, seed=11)[0]
    eng = LLMEngine(model)
    greedy = eng.generate([p], GREEDY)[0]
    assert eng.generate([p], SamplingParams(max_tokens=24, temperature=1.0, top_p=5e-324, seed=1))[0] == greedy
    every = SamplingParams(max_tokens=24, temperature=0.8, top_k=10**20, seed=4)
    assert eng.generate([p], every)[0] == eng.generate([p], SamplingParams(max_tokens=24, temperature=0.8, seed=4))[0]


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(top_p=float("inf")), dict(seed=2**64),
                                 dict(top_k=1.5), dict(repetition_penalty=float("-inf"))])
def test_sampling_params_refuse_non_finite_and_out_of_range(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_abort_all_ends_every_stream_with_the_reason(model):
    """AsyncEngine.abort_all (server shutdown) ends each running stream with 'abort' and the given error."""
    engine = AsyncEngine(LLMEngine(model))
    endless = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def run(p):
        last = None
        async for out in engine.generate(p, endless):
            last = out
        return last.finish_reason, last.error, last.num_output_tokens

    async def main():
        tasks = [asyncio.create_task(run(p)) for p in prompts(3, seed=12)]
        while engine.stats()["running"] < 3:
            await asyncio.sleep(0.01)
        engine.abort_all("the server is shutting down")
        return await asyncio.gather(*tasks)

    try:
        for reason, error, n in asyncio.run(main()):
            assert (reason, error) == ("abort", "the server is shutting down") and n < 400
    finally:
        engine.shutdown(grace_s=0)


def test_warm_up_runs_a_chunk_over_cached_context():
    """The warm-up also continues its short prompt from the prefix cache, as a chat turn does: the first real
    turn then meets no kernel compiled on first use (on CUDA, the prefix-prefill kernel's). (Lengths within the
    training length, as the released models' 128-token dummy prompts are: a longer one's NTK RoPE base, part
    of the cache salt, changes with its length.)"""
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=128,
                         training_seqlen=512, seq_length=512)
    model = TelechatForCausalLM(cfg).eval()
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=300, kv_cache_memory=2 << 20))
    steps = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    engine.warm_up()
    over_cache = [c for s in steps for c in s.prefills if c.start > 0]
    assert over_cache and all(c.num_tokens <= PREFIX_KERNEL_TOKENS for c in over_cache)
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_warm_up_leaves_no_trace(model):
    """The start-up warm-up (dummy prefills of the whole step budget and a short prompt, and their decode
    steps) leaves the engine as a fresh one: figures at zero, every block free, nothing in the prefix
    cache (its own dummy prompt is not served from it), the same greedy outputs."""
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=300, kv_cache_memory=2 << 20)
    fresh, warmed = LLMEngine(model, config), LLMEngine(model, dataclasses.replace(config, warm_up=True))
    assert warmed.stats() == fresh.stats() and warmed.scheduler.pool.num_free == fresh.scheduler.pool.num_free
    dummy = [1 + (11 * j) % (VOCAB - 1) for j in range(128)]
    rid = warmed.add_request(dummy, SamplingParams(max_tokens=3, temperature=0))
    outs = []
    while warmed.has_unfinished():
        outs += [o for o in warmed.step() if o.request_id == rid]
    assert outs[-1].num_cached_tokens == 0
    ps = prompts(3, seed=5)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    assert warmed.generate(ps, greedy) == fresh.generate(ps, greedy)
