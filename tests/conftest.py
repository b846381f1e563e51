"""Shared fixtures. Tests read the reference material in ../shared (CI has it beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REF = SHARED / "telechat-ref"
GOLDEN_DIR = REF / "golden"
TOKENIZER_12B = REF / "tokenizer-12b"
SFT_DATA = REF / "sft-data"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The built-in demo model, built once per test session."""
    from telechat.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


@pytest.fixture(scope="session")
def tokenizer_12b_dir() -> Path:
    """The official TeleChat 12B tokenizer folder (tokenizer.model + configs)."""
    if not (TOKENIZER_12B / "tokenizer.model").is_file():
        pytest.skip(f"reference tokenizer not found at {TOKENIZER_12B}")
    return TOKENIZER_12B


@pytest.fixture(scope="session")
def tokenizer_12b(tokenizer_12b_dir: Path):
    """The 12B tokenizer through AutoTokenizer (fast), no trust_remote_code."""
    import telechat  # noqa: F401  (registers the tokenizer classes)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_12b_dir))


@pytest.fixture(scope="session")
def tokenizer_12b_slow(tokenizer_12b_dir: Path):
    """The slow (sentencepiece) 12B tokenizer."""
    from telechat.tokenizer import TelechatTokenizer

    return TelechatTokenizer.from_pretrained(str(tokenizer_12b_dir))


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly trained demo (7B-style byte-level BPE) tokenizer folder."""
    from telechat.tokenizer import build_demo_tokenizer

    path = tmp_path_factory.mktemp("demo_tokenizer")
    build_demo_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir: Path):
    """The demo tokenizer loaded through AutoTokenizer."""
    import telechat  # noqa: F401
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))
