"""Fixtures of the vLLM lane (run in its own venv by run_tests.py; vLLM must be importable).

Tiny checkpoints are written with our own ``telechat`` code from the official ``config.json`` files
(shrunk to hidden 128, 4 heads → head_dim 32, the smallest vLLM's CPU attention accepts), in the two
released layouts: 7B (keys without ``transformer.``, tied head, byte-level BPE demo tokenizer) and
12B (``transformer.`` prefix, ``lm_head``, the official SentencePiece tokenizer). Everything runs in
float32 with eager execution: bf16 or compiled runs change greedy output on random tiny weights.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REF

pytest.importorskip("vllm", reason="the vLLM lane runs in .venv-vllm (python run_tests.py sets it up)")

# CPU engine settings for a 2-core machine: 1 GiB of KV cache, one thread per process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_SHAPE = dict(hidden_size=128, n_head=4, n_layer=2, ffn_hidden_size=256)
MAX_MODEL_LEN = 512
"""Below training_seqlen (8192): the plugin's RoPE is exactly the official one for every length."""

PROMPTS = (
    "你好，请介绍一下中国电信的星辰大模型。",
    "TeleChat 是一个开源的大语言模型，支持中英文对话。Explain rotary position embeddings in two sentences, "
    "然后用中文总结一下它们在长上下文外推中的作用，以及 NTK 方法为什么能改善外推效果。" * 3,
)
"""A short and a ~150-token prompt, Chinese and mixed."""


def _write_tiny(out: Path, official_config: str, tokenizer_dir: Path | None, layout_7b: bool) -> Path:
    """A tiny checkpoint with the official config keys of ``official_config`` (shapes shrunk)."""
    from safetensors.torch import save_file

    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer, load_tokenizer

    out.mkdir(parents=True)
    if tokenizer_dir is None:
        build_demo_tokenizer(out)
    else:
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, out / name)
    vocab = len(load_tokenizer(out))
    config = json.loads((REF / "configs" / official_config / "config.json").read_text(encoding="utf-8"))
    config.update(TINY_SHAPE, vocab_size=vocab, initializer_range=0.1)
    torch.manual_seed(0)
    model = TelechatForCausalLM(TelechatConfig(**config)).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout_7b:  # the 7B release: no prefix, no lm_head tensor (tied)
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_7b(tmp_path_factory) -> Path:
    """7B layout: official 7B config keys (tied head, base length 4096 → NTK alpha 3), demo BPE tokenizer."""
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "7b", "7B", None, layout_7b=True)


@pytest.fixture(scope="session")
def tiny_12b(tmp_path_factory, tokenizer_12b_dir: Path) -> Path:
    """12B layout: official 12B config keys (untied lm_head, ``transformer.`` prefix), official tokenizer."""
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "12b", "12B", tokenizer_12b_dir, layout_7b=False)


def start_llm(model: Path, **kwargs):
    """A vLLM engine on ``model`` in float32, eager (unless ``kwargs`` say otherwise), seeded."""
    from vllm import LLM

    options = dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, seed=0, max_num_seqs=4)
    return LLM(model=str(model), **{**options, **kwargs})


def stop_llm(llm) -> None:
    """Shut the engine's processes down now rather than at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def llm_factory() -> Iterator:
    """``llm_factory(model, **kwargs)``: engines started in this module, shut down at its end."""
    started = []

    def make(model: Path, **kwargs):
        llm = start_llm(model, **kwargs)
        started.append(llm)
        return llm

    yield make
    for llm in started:
        stop_llm(llm)


class Native:
    """Our own model on the same folder: the reference for logits and greedy decoding."""

    def __init__(self, model: Path) -> None:
        from telechat.model.loader import load_model
        from telechat.tokenizer import load_tokenizer

        self.model = load_model(model, device="cpu", dtype="float32")
        self.tokenizer = load_tokenizer(model)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` log-probabilities of the next token after each prefix (one uncached pass)."""
        logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens, each from a full uncached forward."""
        out = list(ids)
        for _ in range(n):
            out.append(int(self.logprobs(out)[-1].argmax()))
        return out[len(ids):]
