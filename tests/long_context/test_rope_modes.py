"""The three RoPE scaling modes follow the official formulas (docs/model.md, RoPE) and the golden logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from telechat.model.checkpoint import CheckpointError
from telechat.model.loader import load_model
from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatRotary
from telechat.model.rope import rope_params
from tests.long_context.conftest import GOLDEN_7B

GOLDEN_LENGTHS = (7, 50, 200, 5000, 9000)


def official_rope(length: int, head_dim: int, training_seqlen: int, base_seqlen: int, mode: str):
    """(alpha, base, mscale) as ``RotaryEmbedding.forward`` of models/7B/modeling_telechat.py derives them
    (``get_ntk_alpha`` with the hard-coded 4096 replaced by ``base_seqlen``, as TeleChat2 does).

    ``none`` is plain RoPE (alpha 1, mscale 1, the golden negative control); ``ntk`` keeps the NTK
    base and drops the mscale factor (the seed table's "NTK" row).
    """
    seq_len = max(length, training_seqlen)
    if mode == "none":
        return 1, 10000.0, 1.0
    alpha = max(2 ** math.ceil(math.log(seq_len / base_seqlen, 2) + 1) - 1, 1)
    base = 10000 * alpha ** (head_dim / (head_dim - 2))
    scale = seq_len / training_seqlen
    mscale = 1.0 if scale <= 1 or mode == "ntk" else 0.1 * math.log(scale) + 1.0
    return alpha, base, mscale


def step_lengths(training_seqlen: int, base_seqlen: int) -> list[int]:
    """Lengths on both sides of every alpha step (B, 2B, 4B, ... up to 24B = 96K for 7B) and of T."""
    edges = [base_seqlen * 2**k for k in range(-1, 6)] + [24 * base_seqlen, training_seqlen]
    return sorted({max(1, e + d) for e in edges for d in (-1, 0, 1)})


SHAPES = {
    "7B": (128, 8192, 4096),  # released 7B: alpha 3 already at 8K
    "12B": (160, 8192, 8192),
    "golden": (16, 64, 4096),  # training length below the NTK base
    "tiny": (16, 16, 8),
}


@pytest.mark.parametrize("mode", ("none", "ntk", "ntk+scaling"))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_params_cross_every_alpha_step_like_the_official_code(shape, mode):
    """alpha, base and mscale equal the official derivation just below, at and above every step."""
    head_dim, training, base_len = SHAPES[shape]
    alphas = set()
    for length in step_lengths(training, base_len):
        p = rope_params(length, head_dim=head_dim, training_seqlen=training, base_seqlen=base_len, mode=mode)
        alpha, base, mscale = official_rope(length, head_dim, training, base_len, mode)
        assert (p.alpha, p.mscale) == pytest.approx((alpha, mscale), rel=1e-12), length
        assert p.base == pytest.approx(base, rel=1e-12), length
        alphas.add(alpha)
    if mode != "none":
        assert {3, 7, 15, 31, 63} <= alphas  # the grid really crossed the steps


def test_released_7b_values_from_spec():
    """docs/model.md figures: 7B at 8K alpha 3 (base ≈ 30527.7), 16K alpha 7 / mscale 1.0693, 32K alpha 15 / 1.1386."""
    kw = dict(head_dim=128, training_seqlen=8192, base_seqlen=4096)
    assert rope_params(8192, **kw).base == pytest.approx(30527.7, abs=0.1)
    p16, p32 = rope_params(16384, **kw), rope_params(32768, **kw)
    assert (p16.alpha, round(p16.mscale, 4), p32.alpha, round(p32.mscale, 4)) == (7, 1.0693, 15, 1.1386)


@pytest.mark.parametrize("mode", ("none", "ntk", "ntk+scaling"))
def test_model_tables_equal_official_tables(mode):
    """The model's cos/sin at positions of a long sequence equal the official table rows."""
    config = TelechatConfig(hidden_size=64, n_head=4, n_layer=1, vocab_size=32, training_seqlen=16,
                            base_seqlen=8, rope_mode=mode)
    rotary = TelechatRotary(config)
    for length in (15, 16, 17, 33, 65, 200):
        alpha, base, mscale = official_rope(length, 16, 16, 8, mode)
        inv = 1.0 / (base ** (torch.arange(0, 16, 2).float() / 16))
        t = torch.arange(max(length, 16)).float()
        emb = torch.cat((torch.outer(t, inv),) * 2, dim=-1)
        pos = torch.arange(length)
        cos, sin = rotary.tables(pos, length, torch.float32)
        torch.testing.assert_close(cos, mscale * emb.cos()[:length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin, mscale * emb.sin()[:length], rtol=1e-5, atol=1e-5)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def golden_by_mode():
    """The golden checkpoint loaded once per mode through ``load_model(..., rope_mode=...)``."""
    return {m: load_model(GOLDEN_7B, device="cpu", dtype="float32", rope_mode=m) for m in ("none", "ntk+scaling")}


@pytest.mark.parametrize("length", GOLDEN_LENGTHS)
def test_load_model_mode_selects_official_or_plain_rope(golden_by_mode, golden_refs, length):
    """rope_mode='ntk+scaling' reproduces the official logits, rope_mode='none' the plain-RoPE control."""
    ids = torch.from_numpy(golden_refs[f"input_ids_L{length}"])[None]
    expected = {"ntk+scaling": f"ideal_logits_last_L{length}", "none": f"naive_rope_logits_last_L{length}"}
    for mode, model in golden_by_mode.items():
        assert model.config.rope_mode == mode
        with torch.inference_mode():
            last = model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].numpy()
        assert _rel(last, golden_refs[expected[mode]]) < 1e-3, mode
    if length > 64:  # past training_seqlen the two references differ: the selection has teeth
        assert _rel(golden_refs[expected["none"]], golden_refs[expected["ntk+scaling"]]) > 1e-2


@pytest.mark.parametrize("length", (200, 5000, 9000))
def test_chunked_cached_prefill_with_pinned_rope_equals_golden(golden_by_mode, golden_refs, length):
    """A window fed in KV-cached chunks with rope_length=L gives the official single-pass logits."""
    model = golden_by_mode["ntk+scaling"]
    ids = torch.from_numpy(golden_refs[f"input_ids_L{length}"])[None]
    positions = golden_refs[f"positions_L{length}"]
    cache, hidden = DynamicCache(config=model.config), []
    chunk = max(length // 5, 1) + 3  # uneven chunks, the first one shorter than training_seqlen for L=200
    with torch.inference_mode():
        for start in range(0, length, chunk):
            out = model.transformer(input_ids=ids[:, start : start + chunk], past_key_values=cache, use_cache=True,
                                    rope_length=length)
            hidden.append(out.last_hidden_state[0, [p - start for p in positions if start <= p < start + chunk]])
        logits = model.lm_head(torch.cat(hidden)).numpy()
    assert _rel(logits, golden_refs[f"ideal_logits_pos_L{length}"]) < 1e-3


def test_ntk_mode_is_ntk_base_without_attention_scaling(golden_refs):
    """At L=5000 'ntk' (alpha 3, mscale 1) equals 'ntk+scaling' once training_seqlen=5000 removes the
    mscale but keeps alpha 3, and differs from 'ntk+scaling' at the checkpoint's training_seqlen."""
    ids = torch.from_numpy(golden_refs["input_ids_L5000"])[None]
    logits = {}
    for key, kw in {"ntk": dict(rope_mode="ntk"), "scaled": dict(rope_mode="ntk+scaling"),
                    "unscaled": dict(rope_mode="ntk+scaling", training_seqlen=5000)}.items():
        model = load_model(GOLDEN_7B, device="cpu", dtype="float32", **kw)
        with torch.inference_mode():
            logits[key] = model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].numpy()
    assert _rel(logits["ntk"], logits["unscaled"]) < 1e-5
    assert _rel(logits["ntk"], logits["scaled"]) > 1e-2


def test_unknown_mode_is_refused_at_load():
    """A bad rope_mode is refused when the model loads, naming the allowed values."""
    with pytest.raises(CheckpointError, match="none, ntk, ntk\\+scaling"):
        load_model(GOLDEN_7B, device="cpu", dtype="float32", rope_mode="yarn")
