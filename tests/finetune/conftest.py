"""Fixtures for the fine-tuning job: a tiny TeleChat checkpoint, official SFT data, a CLI runner.

The model is the official 7B layout (tied head, byte-level BPE demo tokenizer) at hidden 64 /
2 layers, random init: big enough to exercise every code path, small enough that a training
step takes milliseconds on one core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SFT_DATA, fixture_file

TINY_SHAPE = dict(hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=128, training_seqlen=512, seq_length=1024)


@pytest.fixture(scope="session")
def official_sft() -> dict[str, Path]:
    """The official example files: ``single``, ``multi`` (training) and ``test`` (prompts only)."""
    files = {"single": SFT_DATA / "single_turn_example.jsonl", "multi": SFT_DATA / "multi_turn_example.jsonl",
             "test": SFT_DATA / "test.jsonl"}
    for path in files.values():
        fixture_file(path)
    return files


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init tiny TeleChat checkpoint folder with tokenizer and generation_config.json."""
    import torch

    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer, load_tokenizer

    out = tmp_path_factory.mktemp("finetune") / "tiny"
    ids = build_demo_tokenizer(out)
    tokenizer = load_tokenizer(out)
    config = TelechatConfig(vocab_size=len(tokenizer), **TINY_SHAPE, tie_word_embeddings=True,
                            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                            pad_token_id=ids["pad_token_id"], architectures=["TelechatForCausalLM"])
    torch.manual_seed(0)
    TelechatForCausalLM(config).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, **ids}), encoding="utf-8")
    return out


def official_subset(files: dict[str, Path], out: Path, n_single: int, n_multi: int) -> Path:
    """A jsonl of the first single-turn and multi-turn official examples."""
    lines = (files["single"].read_text(encoding="utf-8").splitlines()[:n_single]
             + files["multi"].read_text(encoding="utf-8").splitlines()[:n_multi])
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def child_env() -> dict[str, str]:
    """Environment of CLI subprocesses: one OpenMP thread each (2-core CI), unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, timeout: float = 180, launcher: list[str] | None = None,
            umask: int = -1) -> subprocess.CompletedProcess:
    """``python -m jobs.finetune ARGS`` (or under ``launcher``, e.g. torchrun) in the repo, output captured;
    ``umask`` sets the child's (-1: inherited)."""
    cmd = (launcher or [sys.executable]) + ["-m", "jobs.finetune", *args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout, umask=umask)


def log_history(checkpoint_or_output: Path) -> list[dict]:
    """The Trainer's log history (one dict per log line) of a checkpoint folder."""
    return json.loads((checkpoint_or_output / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]


def step_losses(history: list[dict]) -> dict[int, float]:
    """Training loss by optimizer step, from a log history logged every step."""
    return {h["step"]: h["loss"] for h in history if "loss" in h}
