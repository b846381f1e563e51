"""The built-in demo model: a tiny TeleChat checkpoint made locally in seconds, no download.

Layout is the official 7B one (tied head, byte-level BPE ``tokenizer.json``), so the demo also
exercises that loading path. The weights are briefly trained on a few canned dialogs
(``data/demo_dialogs.jsonl``) so replies are readable; ``config.json`` carries
``"telechat_demo": true`` and every service that serves it labels it a demo.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEMO_VERSION = 2
"""Bump when the recipe changes so cached demo models are rebuilt."""

DEMO_SHAPE = dict(hidden_size=128, n_layer=2, n_head=4, ffn_hidden_size=352, training_seqlen=512,
                  seq_length=2048)
"""head_dim 32: the smallest that every attention backend we target accepts."""


def default_demo_dir() -> Path:
    """Where the demo model lives when no model is configured (``TELECHAT_HOME`` overrides)."""
    home = Path(os.environ.get("TELECHAT_HOME", Path.home() / ".cache" / "telechat-stack"))
    return home / f"demo-model-v{DEMO_VERSION}"


def ensure_demo_model(path: Path | None = None) -> Path:
    """Return the demo model folder, building it first if it is missing."""
    path = Path(path) if path else default_demo_dir()
    if not (path / "config.json").is_file():
        log.info("building the demo model in %s (first use, a few seconds)", path)
        build_demo_model(path)
    return path


def _dialogs() -> list[dict]:
    """Canned dialogs; ``"endless": true`` ones are trained without their final ``<_end>``, so the
    demo keeps writing on those prompts until max_tokens (handy to try Stop and aborts)."""
    text = resources.files("telechat.data").joinpath("demo_dialogs.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


DEMO_TRAIN_STEPS = 160
LEARNING_RATE = 5e-3


def build_demo_model(out_dir: str | Path, *, seed: int = 0, train_steps: int = DEMO_TRAIN_STEPS) -> Path:
    """Write the demo checkpoint (weights, config, tokenizer, generation config) to ``out_dir``.

    Deterministic for a given seed. Written to a temporary folder first and renamed, so an
    interrupted build never leaves a half-written model behind.
    """
    from telechat.chat_format import ChatFormat
    from telechat.config import TelechatConfig
    from telechat.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer, load_tokenizer

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    try:
        special = build_demo_tokenizer(tmp)
        tokenizer = load_tokenizer(tmp)
        generation = {
            "max_length": DEMO_SHAPE["seq_length"], "do_sample": False, "use_cache": True,
            "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.03, **special,
        }
        config = TelechatConfig(
            vocab_size=len(tokenizer), **DEMO_SHAPE, tie_word_embeddings=True,
            bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
            pad_token_id=special["pad_token_id"], architectures=["TelechatForCausalLM"], telechat_demo=True,
        )
        torch.manual_seed(seed)
        model = TelechatForCausalLM(config)
        _train(model, ChatFormat(tokenizer, generation), seed=seed, steps=train_steps)
        model.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(
            "# TeleChat Stack demo model\n\nA tiny TeleChat-architecture model trained for seconds on a few canned "
            "dialogs. It is NOT TeleChat: it exists so the stack runs with no weights configured.\n",
            encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _train(model, chat, *, seed: int, steps: int, batch_size: int = 8) -> None:
    if steps < 1:
        raise ValueError("train_steps must be at least 1")
    """Fit the canned dialogs (loss on answers only) so the demo's replies are readable."""
    samples = []
    for dialog in _dialogs():
        ids, labels = [], []
        for prompt, answer in chat.encode_turns(dialog["messages"]):
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        if dialog.get("endless"):
            ids, labels = ids[:-1], labels[:-1]
        samples.append((ids, labels))
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    warmup = max(1, steps // 10)  # linear warm-up, then linear decay to 10 %
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warmup if i < warmup else max(0.1, 1 - (i - warmup) / max(1, steps - warmup)))
    model.train()
    for _ in range(steps):
        batch = rng.sample(samples, min(batch_size, len(samples)))
        width = max(len(ids) for ids, _ in batch)
        pad = model.config.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    log.info("demo model trained: final loss %.3f", loss.item())
