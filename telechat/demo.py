"""The built-in demo model: a tiny TeleChat checkpoint made locally in seconds, no download.

Layout is the official 7B one (tied head, byte-level BPE ``tokenizer.json``), so the demo also
exercises that loading path. The weights are briefly trained on a few canned dialogs
(``data/demo_dialogs.jsonl``) so replies are readable, and on random other prompts (Chinese,
English, symbols) answered with :data:`NOTICE`, so anything else gets that labelled canned reply
rather than broken text; ``config.json`` carries ``"telechat_demo": true`` and every service that
serves it labels it a demo.
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

DEMO_VERSION = 3
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


NOTICE = "[Demo model] 这是演示模型的固定回复，没有学过这个问题。"
"""The demo's answer to every prompt it was not trained on: clearly labelled, whole characters."""

DEMO_TRAIN_STEPS = 200
"""Steps of the one recipe: ``ensure_demo_model`` (the server) and ``telechat demo-model`` both use it."""
LEARNING_RATE = 5e-3


def build_demo_model(out_dir: str | Path, *, seed: int = 0, train_steps: int = DEMO_TRAIN_STEPS) -> Path:
    """Write the demo checkpoint (weights, config, tokenizer, generation config) to ``out_dir``.

    Deterministic for a given seed. Written to a temporary folder first and renamed, so an
    interrupted build never leaves a half-written model behind.
    """
    from telechat.chat_format import ChatFormat
    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM
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


def _unseen_prompt(rng: random.Random, pools: dict[str, list[str]]) -> str:
    """A prompt the canned dialogs do not have: random Chinese (common and rare characters), English
    words, digits, symbols and mixes of them; short ones most often."""
    kind = rng.random()
    n = min(1 + int(rng.expovariate(1 / 4)), 16)
    if kind < 0.3:  # characters of the demo corpus in new orders
        text = "".join(rng.choice(pools["chars"]) for _ in range(n))
    elif kind < 0.45:  # any CJK character (byte-level pieces the corpus never merged)
        text = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n))
    elif kind < 0.75:  # English words
        text = " ".join(rng.choice(pools["words"]) for _ in range(n))
    elif kind < 0.85:  # a known prompt with something around it
        text = rng.choice(pools["prompts"])
        extra = "".join(rng.choice(pools["chars"]) for _ in range(rng.randint(2, 8)))
        text = text + extra if rng.random() < 0.5 else extra + text
    else:  # printable ASCII, digits and emoji
        text = "".join(rng.choice(pools["misc"]) for _ in range(n))
    return text + rng.choice(("", "", "？", "?", "。", "！", "."))


def _pools(dialogs: list[dict]) -> dict[str, list[str]]:
    from telechat.tokenizer import demo_corpus

    corpus = demo_corpus()
    prompts = [m["content"] for d in dialogs for m in d["messages"] if m["role"] == "user"]
    return {
        "chars": sorted({c for c in corpus if "\u4e00" <= c <= "\u9fa5"}),
        "words": sorted({w.strip(".,!?;:'\"()").lower() for w in corpus.split() if w.isascii()} - {""}),
        "prompts": sorted(set(prompts)),
        "misc": [chr(c) for c in range(33, 127)] + list("😊🎉👋🚀✨🌸  "),
    }


def _train(model, chat, *, seed: int, steps: int, batch_size: int = 6, unseen_per_step: int = 6) -> None:
    """Fit the canned dialogs and map unseen prompts to :data:`NOTICE` (loss on answers only)."""
    if steps < 1:
        raise ValueError("train_steps must be at least 1")
    dialogs = _dialogs()
    known = {tuple((m["role"], m["content"]) for m in d["messages"][:-1]) for d in dialogs}

    def sample(messages: list[dict], endless: bool = False) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for prompt, answer in chat.encode_turns(messages):
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return (ids[:-1], labels[:-1]) if endless else (ids, labels)

    canned = [sample(d["messages"], d.get("endless", False)) for d in dialogs]
    short = [s for s in canned if len(s[0]) <= 128]
    long = [s for s in canned if len(s[0]) > 128]  # the endless and long answers: batched together
    pools = _pools(dialogs)
    rng = random.Random(seed)

    def unseen() -> tuple[list[int], list[int]]:
        messages = [{"role": "user", "content": _unseen_prompt(rng, pools)}]
        if rng.random() < 0.2:  # after a canned turn, or under a system prompt
            first = rng.choice([d for d in dialogs if not d.get("endless")])["messages"]
            messages = first + messages
        while tuple((m["role"], m["content"]) for m in messages) in known:
            messages[-1]["content"] += "？"
        return sample(messages + [{"role": "assistant", "content": NOTICE}])

    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    warmup = max(1, steps // 10)  # linear warm-up, then linear decay to 10 %
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warmup if i < warmup else max(0.1, 1 - (i - warmup) / max(1, steps - warmup)))
    pad = model.config.pad_token_id
    model.train()
    for step in range(steps):
        if long and step % 6 == 5:
            batch = long
        else:
            batch = rng.sample(short, min(batch_size, len(short))) + [unseen() for _ in range(unseen_per_step)]
        width = max(len(ids) for ids, _ in batch)
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
