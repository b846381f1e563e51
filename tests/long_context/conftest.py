"""Fixtures of the long-context tests: the official golden model and a tiny checkpoint with a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import GOLDEN_DIR

GOLDEN_7B = GOLDEN_DIR / "v7b"
TINY_TRAINING_SEQLEN = 32
"""Training (and NTK base) length of the tiny checkpoint: RoPE scaling starts past 32 tokens."""


@pytest.fixture(scope="session")
def golden_refs() -> np.lib.npyio.NpzFile:
    """Reference logits of the official 7B modeling code (tiny random weights, training_seqlen 64)."""
    return np.load(GOLDEN_7B / "refs.npz")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random TeleChat checkpoint (hidden 64, 2 layers, head_dim 16) with the demo tokenizer.

    Weights are drawn wider than the default init so attention patterns, and therefore RoPE
    scaling, change the logits noticeably.
    """
    import telechat  # noqa: F401  (registers the Auto classes)
    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer, load_tokenizer

    out = tmp_path_factory.mktemp("long-context") / "tiny"
    special = build_demo_tokenizer(out)
    tokenizer = load_tokenizer(out)
    config = TelechatConfig(
        vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=128,
        training_seqlen=TINY_TRAINING_SEQLEN, base_seqlen=TINY_TRAINING_SEQLEN, seq_length=4096,
        initializer_range=0.15, tie_word_embeddings=True, architectures=["TelechatForCausalLM"],
        bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
    )
    torch.manual_seed(0)
    TelechatForCausalLM(config).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(special), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """The tiny checkpoint loaded in float32 on CPU."""
    from telechat.model.loader import load_model

    return load_model(tiny_ckpt, device="cpu", dtype="float32")
