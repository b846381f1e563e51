"""Golden conformance: our model reproduces the official implementation's logits and greedy decodes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import telechat  # noqa: F401  (registers the Auto classes)
from tests.conftest import GOLDEN_DIR

LENGTHS = (7, 50, 200, 5000, 9000)
GOLDEN = sorted(p for p in GOLDEN_DIR.iterdir() if (p / "refs.npz").is_file()) if GOLDEN_DIR.is_dir() else []


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=GOLDEN, ids=[p.name for p in GOLDEN])
def golden(request):
    refs = np.load(request.param / "refs.npz")
    model = AutoModelForCausalLM.from_pretrained(request.param, dtype=torch.float32).eval()
    return request.param, model, refs


def test_golden_fixtures_present():
    """The golden fixture is in tests/fixtures (without it the parametrized tests would not run at all)."""
    assert GOLDEN, f"no golden checkpoints under {GOLDEN_DIR}"


@pytest.mark.parametrize("length", LENGTHS)
def test_last_logits_match_reference(golden, length):
    """Last-position logits are within 1e-3 relative of the official float32 reference at every length,
    including those past 4096/8192 that exercise the NTK base and mscale."""
    _, model, refs = golden
    ids = torch.from_numpy(refs[f"input_ids_L{length}"])[None]
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[0].numpy()
    assert _rel(logits[-1], refs[f"ideal_logits_last_L{length}"]) < 1e-3
    assert _rel(logits[-1], refs[f"shipped_logits_last_L{length}"]) < 1e-3
    pos = refs[f"positions_L{length}"]
    assert _rel(logits[pos], refs[f"ideal_logits_pos_L{length}"]) < 1e-3
    if length > 64:  # past training_seqlen plain RoPE differs: the comparison has teeth
        assert _rel(logits[-1], refs[f"naive_rope_logits_last_L{length}"]) > 1e-2


@pytest.mark.parametrize("length", (7, 50))
def test_greedy_decode_matches_reference(golden, length):
    """generate() with the KV cache emits the official greedy tokens."""
    _, model, refs = golden
    ids = torch.from_numpy(refs[f"input_ids_L{length}"])[None]
    out = model.generate(ids, do_sample=False, max_new_tokens=10, eos_token_id=None, repetition_penalty=1.0,
                         attention_mask=torch.ones_like(ids))
    assert out[0, length:].tolist() == refs[f"shipped_greedy_L{length}"].tolist()


def test_bin_and_safetensors_load_identically(golden, tmp_path):
    """The .bin file alone loads to the same weights as the safetensors file."""
    path, model, _ = golden
    for f in ("config.json", "pytorch_model.bin"):
        shutil.copy(path / f, tmp_path / f)
    other = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
