"""The FP8 (E4M3) KV cache on CPU: what it stores, what attention reads back, capacity, prefix caching.

The perplexity budget on a trained model is in tests/quant/test_fp8.py; the Triton kernels are
checked against these paths on the GPU in tests/engine/test_cuda.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.kv_cache import PagedKVCache, kv_cache_torch_dtype
from telechat.engine.paged_attention import paged_decode_attention
from telechat.engine.sampling import SamplingParams
from telechat.model.attention import attention
from telechat.model.config import TelechatConfig
from telechat.model.kernels import rope_and_cache
from telechat.model.modeling import TelechatForCausalLM
from telechat.tools.perplexity import paged_window_nll, window_nll

E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def model() -> TelechatForCausalLM:
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=300, hidden_size=64, n_layer=2, n_head=4, num_key_value_heads=2,
                         ffn_hidden_size=128, training_seqlen=512, seq_length=512)
    return TelechatForCausalLM(cfg).eval()


def test_cache_stores_scaled_saturated_e4m3_and_attention_reads_it_back():
    """Writes divide by the layer's scale and saturate at ±448; decode attention over the FP8 cache
    equals attention over the dequantized values."""
    torch.manual_seed(1)
    t, heads, n_kv, d, bs = 12, 4, 2, 8, 4
    kc = torch.zeros(32, n_kv, d, dtype=E4M3)
    vc = torch.zeros_like(kc)
    q, k, v = torch.randn(t, heads, d), torch.randn(t, n_kv, d) * 3, torch.randn(t, n_kv, d)
    k[0, 0, 0] = 1e6  # out of range: saturates instead of turning into NaN
    cos, sin = torch.ones(t, d), torch.zeros(t, d)  # identity rotation
    slots = torch.arange(4, 4 + t)
    rope_and_cache(q, k, v, cos, sin, kc, vc, slots, 0.5, 2.0)
    assert kc.dtype == E4M3 and torch.isfinite(kc.float()).all()
    assert kc[4, 0, 0].float() == 448
    torch.testing.assert_close(kc[slots].float(), (k / 0.5).clamp(-448, 448).to(E4M3).float())
    torch.testing.assert_close(vc[slots].float(), (v / 2.0).to(E4M3).float())
    table = torch.tensor([[1, 2, 3, 0]], dtype=torch.int32)
    out = paged_decode_attention(q[-1:], kc, vc, table, torch.tensor([t], dtype=torch.int32), bs, 0.5, 2.0)
    keys = (kc[slots].float() * 0.5).repeat_interleave(heads // n_kv, 1).transpose(0, 1)[None]
    vals = (vc[slots].float() * 2.0).repeat_interleave(heads // n_kv, 1).transpose(0, 1)[None]
    ref = attention(q[-1:].transpose(0, 1)[None], keys, vals)[0].transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fp8_cache_holds_twice_the_tokens_of_a_16_bit_cache(model):
    """Same memory budget, half the bytes per token: the capacity doubles (bf16 model)."""
    budget = 2 * 16 * 64 * PagedKVCache.bytes_per_token(2, 2, 16, torch.bfloat16)  # 64 blocks of 16 at bf16
    caps = {}
    for kv in ("auto", "fp8"):
        engine = LLMEngine(copy.deepcopy(model).to(torch.bfloat16),
                           EngineConfig(max_num_seqs=64, max_model_len=512, kv_cache_memory=budget, kv_cache_dtype=kv))
        caps[kv] = engine.capacity_tokens
        assert engine.runner.cache.k[0].dtype == (E4M3 if kv == "fp8" else torch.bfloat16)
    assert caps["fp8"] == 2 * caps["auto"]


def test_prefix_cache_gives_the_same_tokens_with_an_fp8_cache(model):
    """A turn whose history comes from the prefix cache reads the same FP8 values the uncached turn
    computed with: identical greedy tokens with the cache on or off."""
    history = torch.randint(3, 300, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    turns = [history, history + [5, 6, 7, 8, 9]]
    params = SamplingParams(max_tokens=12, temperature=0)
    results = {}
    for caching in (True, False):
        engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_num_seqs=4, max_model_len=256, block_size=8,
                                                              kv_cache_dtype="fp8", enable_prefix_caching=caching))
        results[caching] = [engine.generate([p], params)[0] for p in turns]
        if caching:
            assert engine.stats()["prefix_cache_hits"] > 0
    assert results[True] == results[False]


def test_fp8_cache_scores_close_to_the_exact_cache(model):
    """On a random model the FP8 cache moves the per-token NLL by little, and the auto cache
    reproduces the transformers forward exactly (the paged scorer itself is right)."""
    window = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(3))
    exact, n = window_nll(model, window)
    auto, _ = paged_window_nll(model, window, prefill_chunk=64)
    fp8, _ = paged_window_nll(model, window, prefill_chunk=64, kv_cache_dtype="fp8")
    assert auto == pytest.approx(exact, rel=1e-5)
    assert fp8 != auto
    assert abs(fp8 - auto) / n < 0.02


def test_context_read_from_an_fp8_cache_equals_the_fresh_prompt(model):
    """A prompt attends to the rounded K/V it stores: scoring it in one chunk or in chunks that read
    earlier ones back from the FP8 cache (as a prefix-cached turn does) gives the same NLL."""
    window = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(4))
    whole, _ = paged_window_nll(model, window, prefill_chunk=200, kv_cache_dtype="fp8")
    chunked, _ = paged_window_nll(model, window, prefill_chunk=48, kv_cache_dtype="fp8")
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        kv_cache_torch_dtype("int4", torch.float32)
