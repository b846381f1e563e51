"""Automatic prefix caching on a tiny random model (CPU): reuse is reported, outputs never change."""

from __future__ import annotations

import random

import pytest
import torch

from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.sampling import SamplingParams
from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatForCausalLM

VOCAB = 400
GREEDY = SamplingParams(max_tokens=12, temperature=0)
TRAINING_SEQLEN = 160  # prompts longer than this get another NTK RoPE base


@pytest.fixture(scope="module")
def model() -> TelechatForCausalLM:
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=128,
                         training_seqlen=TRAINING_SEQLEN, seq_length=512, initializer_range=0.3)
    return TelechatForCausalLM(cfg).eval()


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, VOCAB) for _ in range(n)]


def run(eng: LLMEngine, prompt: list[int], params: SamplingParams = GREEDY) -> tuple[list[int], int]:
    """One request to the end: (output ids, cached prompt tokens it reported)."""
    rid = eng.add_request(prompt, params)
    out, cached = [], None
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == rid
            out += o.new_token_ids
            cached = o.num_cached_tokens
    return out, cached


def chat_turns(eng: LLMEngine, history: list[int], turns: int) -> list[tuple[list[int], int]]:
    """A multi-turn chat: each turn resends the history plus the last reply and a new user message."""
    results = []
    for t in range(turns):
        history = history + tokens(5, seed=100 + t)
        reply, cached = run(eng, history)
        results.append((reply, cached))
        history = history + reply
    return results


def test_multi_turn_reuses_history_and_changes_nothing(model):
    """Turn k reuses the KV of turns < k; every reply equals the reply computed without the cache."""
    history = tokens(30, seed=1)
    on = LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=True))
    off = LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=False))
    with_cache, without = chat_turns(on, history, 4), chat_turns(off, history, 4)
    assert [r for r, _ in with_cache] == [r for r, _ in without]
    assert with_cache[0][1] == 0 and all(c == 0 for _, c in without)
    for t in range(1, 4):  # all full blocks of the previous turn's prompt + reply, at least
        prev_prompt = len(history) + 5 * t + sum(len(r) for r, _ in with_cache[:t - 1])
        assert with_cache[t][1] >= (prev_prompt // 4) * 4
    s = on.stats()
    assert s["prefix_cache_hits"] == sum(c for _, c in with_cache) and s["prefix_cache_queries"] >= s["prefix_cache_hits"]
    assert s["kv_usage"] == 0 and off.stats()["prefix_cache_hits"] == 0


def test_identical_prompt_still_computes_its_last_token(model):
    """A prompt cached in full still computes its last token (it yields the first logits)."""
    eng = LLMEngine(model, EngineConfig(block_size=4))
    p = tokens(24, seed=2)  # 6 full blocks
    first, c1 = run(eng, p)
    second, c2 = run(eng, p)
    assert (c1, second) == (0, first)
    assert c2 == 20  # 5 of 6 blocks: the last block holds the token that must be computed


def test_another_rope_base_never_shares_kv(model):
    """A prompt past training_seqlen (another NTK base) does not reuse blocks computed under the base RoPE."""
    eng = LLMEngine(model, EngineConfig(block_size=4))
    off = LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=False))
    short = tokens(120, seed=3)
    long = short + tokens(80, seed=4)
    assert model.rope_params(len(long)) != model.rope_params(len(short))
    run(eng, short)
    got, cached = run(eng, long)
    assert cached == 0 and got == run(off, long)[0]
    again, cached = run(eng, long)
    assert cached > 0 and again == got


def test_eviction_under_a_small_cache_keeps_outputs(model):
    """Many distinct prompts through a cache that holds a few of them: old blocks are evicted (LRU), the
    latest prompt still hits, outputs equal the cache-off ones, and the pool drains."""
    per_token = 2 * 2 * 4 * 16 * 4  # K+V × layers × heads × head_dim × fp32 bytes
    cfg = dict(block_size=4, kv_cache_memory=per_token * 4 * 40, max_num_seqs=2)
    on = LLMEngine(model, EngineConfig(**cfg))
    off = LLMEngine(model, EngineConfig(**cfg, enable_prefix_caching=False))
    prompts = [tokens(36, seed=10 + i) for i in range(6)]
    for p in prompts:
        assert run(on, p)[0] == run(off, p)[0]
    assert run(on, prompts[0])[1] == 0  # evicted long ago
    assert run(on, prompts[0])[1] > 0  # and cached again
    assert on.stats()["kv_usage"] == 0


def test_shared_prefix_in_one_batch(model):
    """Requests that share a system prompt, running together, give the same outputs as without the cache."""
    system = tokens(32, seed=20)
    prompts = [system + tokens(6, seed=30 + i) for i in range(6)]
    on = LLMEngine(model, EngineConfig(block_size=4, max_num_seqs=3))
    off = LLMEngine(model, EngineConfig(block_size=4, max_num_seqs=3, enable_prefix_caching=False))
    assert on.generate(prompts, GREEDY) == off.generate(prompts, GREEDY)
    assert on.stats()["prefix_cache_hits"] > 0
