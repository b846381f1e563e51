"""The built-in demo model: a tiny TeleChat checkpoint made locally in seconds, no download.

Layout is the official 7B one (tied head, byte-level BPE ``tokenizer.json``), so the demo also
exercises that loading path. ``config.json`` carries ``"telechat_demo": true`` and every service
that serves it labels it a demo.

- **Whole characters, by construction.** A byte-level vocabulary normally holds the 256 single
  bytes (and merges of partial characters), and a sampled lone byte of a multi-byte character
  decodes to U+FFFD. The demo's vocabulary has no such piece: its tokens are ASCII (the 128
  one-byte characters and merges of them) or exactly one non-ASCII character each, which BPE
  finds whole because every non-ASCII character is a pre-token of its own (``ignore_merges``).
  A character outside the vocabulary is read as :data:`FALLBACK`, an ordinary one-character
  token, so every prompt still encodes. Every id the head can emit decodes to whole characters,
  at any temperature, top-k, top-p or seed.
- **A labelled reply to everything else.** The weights learn the canned dialogs
  (``data/demo_dialogs.jsonl``) word for word and answer any other prompt with :data:`NOTICE`
  (see :func:`_train`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

DEMO_VERSION = 4
"""Bump when the recipe changes so cached demo models are rebuilt."""

DEMO_SHAPE = dict(hidden_size=128, n_layer=2, n_head=4, ffn_hidden_size=352, training_seqlen=512,
                  seq_length=2048)
"""head_dim 32: the smallest that every attention backend we target accepts."""

NOTICE = "[Demo model] 这是演示模型的固定回复，没有学过这个问题。"
"""The demo's answer to every prompt it was not trained on: clearly labelled, whole characters."""

FALLBACK = "〓"
"""What a character outside the demo's vocabulary is read as (in prompts; it is a whole character)."""

DEMO_TRAIN_STEPS = 100
"""Steps of the one recipe: ``ensure_demo_model`` (the server) and ``telechat demo-model`` both use it."""
LEARNING_RATE = 7e-3
CANNED_ROWS, NOTICE_ROWS, DETOUR_ROWS, UNSEEN_OPENINGS = 24, 4, 6, 16
"""Rows of each kind in a training step (see :func:`_train`)."""
MAX_GAP = 1536
"""Largest distance an endless answer is moved from its prompt in training (see ``Row.gap``)."""
OPENING_TOKENS = 3
"""Answer tokens an opening row keeps."""
DECISION_WEIGHT = 4.0
"""Loss weight of an answer's first token, which chooses between a canned answer and the notice."""
NEAR_MISS_SHARE = 0.3
"""Share of near misses of the canned prompts among the unseen prompts."""


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


def build_demo_model(out_dir: str | Path, *, seed: int = 0, train_steps: int = DEMO_TRAIN_STEPS) -> Path:
    """Write the demo checkpoint (weights, config, tokenizer, generation config) to ``out_dir``.

    Deterministic for a given seed. Written to a temporary folder first and renamed, so an
    interrupted build never leaves a half-written model behind.
    """
    from telechat.chat_format import ChatFormat
    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import load_tokenizer

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    try:
        dialogs = _dialogs()
        special = build_whole_char_tokenizer(tmp, _texts(dialogs))
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
        _train(model, ChatFormat(tokenizer, generation), dialogs, seed=seed, steps=train_steps)
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


# ---------------------------------------------------------------------------------------------
# tokenizer: byte-level BPE whose every piece is whole characters

NON_ASCII = r"[^\x00-\x7f]"


def byte_level_chars() -> list[str]:
    """GPT-2's byte → printable character table, which the ByteLevel pre-tokenizer and decoder use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def byte_level(text: str) -> str:
    """``text`` as byte-level BPE sees it (one printable stand-in character per UTF-8 byte)."""
    table = byte_level_chars()
    return "".join(table[b] for b in text.encode("utf-8"))


def build_whole_char_tokenizer(out_dir: str | Path, texts: list[str], ascii_vocab_size: int = 512) -> dict[str, int]:
    """Write a 7B-style byte-level BPE tokenizer folder whose every piece is whole characters.

    Pieces: the special tokens (ids 0..6, as the other demo tokenizers), the 128 ASCII bytes and
    BPE merges of them learnt on the ASCII runs of ``texts``, then each non-ASCII character of
    ``texts`` and :data:`FALLBACK`, whole. Returns the ids for generation_config.json.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from telechat.tokenizer import DEMO_SPECIAL_TOKENS, MARKER_TOKENS, TOKENIZER_JSON

    table = byte_level_chars()
    # Every non-ASCII character is a pre-token of its own, so BPE never has to build one from its
    # bytes (which would put partial pieces in the vocabulary): ignore_merges looks it up whole.
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(NON_ASCII), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    ascii_bpe = Tokenizer(BPE())
    ascii_bpe.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=ascii_vocab_size, min_frequency=2, initial_alphabet=table[:128],
                                  show_progress=False)
    ascii_bpe.train_from_iterator([re.sub(NON_ASCII + "+", "\n", t) for t in texts], trainer=trainer)
    learnt = json.loads(ascii_bpe.to_str())["model"]

    vocab = {token: i for i, token in enumerate(DEMO_SPECIAL_TOKENS)}
    for piece in [*table[:128], *sorted(learnt["vocab"], key=learnt["vocab"].get)]:
        vocab.setdefault(piece, len(vocab))
    for char in sorted({c for t in texts for c in t if ord(c) > 127} | {FALLBACK}):
        vocab.setdefault(byte_level(char), len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]

    # The unknown-character stand-in is an ordinary token, not "<unk>": the chat format refuses
    # special tokens inside a message, and "<unk>" (kept for the 7B special-token set) never occurs.
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=byte_level(FALLBACK), fuse_unk=True,
                        ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in DEMO_SPECIAL_TOKENS])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_JSON))

    named = {"bos_token": "<_start>", "eos_token": "<_end>", "unk_token": "<unk>", "pad_token": "<_pad>"}
    special_map = {**named, "additional_special_tokens": list(MARKER_TOKENS)}
    config = {**special_map, "tokenizer_class": "BloomTokenizerFast", "padding_side": "left",
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 8192}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    ids = {t: tok.token_to_id(t) for t in DEMO_SPECIAL_TOKENS}
    return {"bos_token_id": ids["<_start>"], "eos_token_id": ids["<_end>"], "pad_token_id": ids["<_pad>"],
            "user_token_id": ids["<_user>"], "bot_token_id": ids["<_bot>"]}


# ---------------------------------------------------------------------------------------------
# training data


def _dialogs() -> list[dict]:
    """Canned dialogs; ``"endless": true`` ones are trained without their final ``<_end>``, so the
    demo keeps writing on those prompts until max_tokens (handy to try Stop and aborts)."""
    text = resources.files("telechat.data").joinpath("demo_dialogs.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _texts(dialogs: list[dict]) -> list[str]:
    """Everything the vocabulary must spell: the bilingual corpus, the dialogs, the notice."""
    from telechat.tokenizer import demo_corpus

    return [*demo_corpus().splitlines(keepends=True), *(m["content"] for d in dialogs for m in d["messages"]),
            NOTICE]


def _pools(dialogs: list[dict]) -> dict[str, list[str]]:
    text = "\n".join(_texts(dialogs))
    return {
        "chars": sorted({c for c in text if "\u4e00" <= c <= "\u9fa5"}),
        "words": sorted({w.strip(".,!?;:'\"()").lower() for w in text.split() if w.isascii()} - {""}),
        "prompts": sorted({m["content"] for d in dialogs for m in d["messages"] if m["role"] == "user"}),
        "misc": [chr(c) for c in range(33, 127)] + list("😊🎉👋🚀✨🌸，。？！、：；“”（）《》…—·  "),
    }


def _near_miss(rng: random.Random, prompt: str, pools: dict[str, list[str]]) -> str:
    """``prompt`` changed a little (a character dropped, added, replaced or swapped; cut short;
    joined to another prompt), so that the choice of a canned answer rests on the whole prompt."""
    new_char = rng.choice(pools["chars"] + pools["misc"] + list("abcdefghijklmnopqrstuvwxyz"))
    i = rng.randrange(len(prompt))
    edit = rng.randrange(7)
    if edit == 0 and len(prompt) > 1:
        return prompt[:i] + prompt[i + 1:]
    if edit == 1:
        return prompt[:i] + new_char + prompt[i:]
    if edit == 2:
        return prompt[:i] + new_char + prompt[i + 1:]
    if edit == 3 and len(prompt) > 2:
        i = min(i, len(prompt) - 2)
        return prompt[:i] + prompt[i + 1] + prompt[i] + prompt[i + 2:]
    if edit == 4 and len(prompt) > 2:
        return prompt[:i + 1] if rng.random() < 0.5 else prompt[i:]
    if edit == 5:
        other = rng.choice(pools["prompts"])
        return prompt + rng.choice(("", " ", "，", "。")) + other
    return prompt + rng.choice(pools["misc"] + pools["chars"]) * rng.randint(1, 3)


def _unseen_prompt(rng: random.Random, pools: dict[str, list[str]]) -> str:
    """A prompt the canned dialogs do not have: near misses of theirs, random Chinese (characters
    of the vocabulary and any others), English words, digits, symbols, emoji and mixes."""
    kind = rng.random()
    n = min(1 + int(rng.expovariate(1 / 5)), 24)
    if kind < NEAR_MISS_SHARE:
        # Short prompts first: random short text falls near them most often ("你去" vs "你好").
        prompts = pools["prompts"]
        return _near_miss(rng, rng.choices(prompts, weights=[1 / len(p) for p in prompts])[0], pools)
    if kind < 0.5:  # characters of the vocabulary in new orders
        text = "".join(rng.choice(pools["chars"]) for _ in range(n))
    elif kind < 0.6:  # any CJK character, most of them outside the vocabulary
        text = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n))
    elif kind < 0.8:
        text = " ".join(rng.choice(pools["words"]) for _ in range(n))
        text = text.capitalize() if rng.random() < 0.5 else text
    elif kind < 0.9:  # a mix of everything
        text = "".join(rng.choice((rng.choice(pools["chars"]), rng.choice(pools["misc"]),
                                   " " + rng.choice(pools["words"]))) for _ in range(n))
    else:  # printable ASCII, digits and emoji
        text = "".join(rng.choice(pools["misc"]) for _ in range(n))
    return text + rng.choice(("", "", "", "？", "?", "。", "！", "."))


# ---------------------------------------------------------------------------------------------
# training


class Row(NamedTuple):
    """One training sequence."""

    ids: list[int]
    weights: list[float]
    """Loss weight of predicting ``ids[i + 1]`` at position ``i`` (0 on prompts and at the end)."""
    gap: int = 0
    """Positions skipped before the last answer, as if it were read deep into a long reply."""
    answer_start: int = 0
    """Index of the last answer's first token."""

    def positions(self, width: int) -> list[int]:
        """Position ids, padded to ``width``."""
        return list(range(self.answer_start)) + list(range(self.answer_start + self.gap, width + self.gap))


def _train(model, chat, dialogs: list[dict], *, seed: int, steps: int) -> None:
    """Fit the canned dialogs and map every other prompt to :data:`NOTICE` (loss on answers only).

    The choice between a canned answer and the notice is made on the first answer token, from
    the whole prompt; the rest of either answer follows from its own beginning. Each step has
    three groups of rows, each its own mean in the loss:

    - *answers*: canned dialogs; unseen prompts with the whole notice (some after a canned turn);
      and *detours*: unseen prompts (half of them near misses of a canned prompt) with a canned
      answer whose first token carries no loss, so that a canned answer, once begun, is finished
      word for word whatever the prompt;
    - *openings*: every canned prompt and many unseen ones (see :func:`_unseen_prompt`), cut
      after the answer's first tokens: short rows that teach the choice cheaply;
    - every other step, the *endless* dialogs, trained without ``<_end>``. Their text ends inside
      its loop (each return to the start of the loop is learnt) and is often read a random
      distance (``Row.gap``) away from its prompt, so that the loop holds however long the reply.
    """
    if steps < 1:
        raise ValueError("train_steps must be at least 1")
    known = {tuple((m["role"], m["content"]) for m in d["messages"][:-1]) for d in dialogs}
    finite = [d["messages"] for d in dialogs if not d.get("endless")]
    single = [m for m in finite if len(m) == 2]

    def row(messages: list[dict], *, endless: bool = False, keep: int | None = None, decide: bool = True,
            gap: int = 0) -> Row:
        """The row of a dialog; ``keep`` cuts its last answer after that many tokens, ``decide=False``
        drops the loss of that answer's first token."""
        ids, weights = [], []
        for prompt, answer in chat.encode_turns(messages):
            ids += prompt + answer
            weights += [0.0] * (len(prompt) - 1) + [DECISION_WEIGHT] + [1.0] * (len(answer) - 1) + [0.0]
        start = len(ids) - len(answer)
        if endless:  # no <_end>: the answer runs on
            ids, weights = ids[:-1], weights[:-2] + [0.0]
        if keep is not None:
            ids, weights = ids[:start + keep], weights[:start + keep - 1] + [0.0]
        if not decide:
            weights[start - 1] = 0.0
        return Row(ids, weights, gap, start)

    canned = [row(m) for m in finite]
    openings = [row(m, keep=OPENING_TOKENS) for m in finite if len(m) == 2]
    endless = [d["messages"] for d in dialogs if d.get("endless")]
    pools = _pools(dialogs)
    rng = random.Random(seed)

    def unseen(prompt: str, answer: str = NOTICE, history: list[dict] | None = None, **kw) -> Row:
        """``prompt`` (after ``history``) answered with ``answer``, made unseen if it was not."""
        messages = (history or []) + [{"role": "user", "content": prompt}]
        while tuple((m["role"], m["content"]) for m in messages) in known:
            messages[-1]["content"] += "？"
        return row(messages + [{"role": "assistant", "content": answer}], decide=answer == NOTICE, **kw)

    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, steps // 10)  # linear warm-up, then linear decay to 10 %
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warmup if i < warmup else max(0.1, 1 - (i - warmup) / max(1, steps - warmup)))
    model.train()
    for step in range(steps):
        notices = [unseen(_unseen_prompt(rng, pools), history=rng.choice(finite) if rng.random() < 0.3 else None)
                   for _ in range(NOTICE_ROWS)]
        detours = [unseen(_near_miss(rng, user["content"], pools) if rng.random() < 0.5 else _unseen_prompt(rng, pools),
                          bot["content"])
                   for user, bot in rng.sample(single, DETOUR_ROWS)]
        groups = [
            rng.sample(canned, min(CANNED_ROWS, len(canned))) + notices + detours,
            openings + [unseen(_unseen_prompt(rng, pools), keep=OPENING_TOKENS) for _ in range(UNSEEN_OPENINGS)],
        ]
        if endless and step % 2:
            groups.append([row(m, endless=True, gap=rng.choice((0, rng.randrange(MAX_GAP)))) for m in endless])
        losses = _row_losses(model, [r for group in groups for r in group]).split([len(g) for g in groups])
        loss = sum(l.sum() / sum(sum(r.weights) for r in g) for l, g in zip(losses, groups))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    log.info("demo model trained: final loss %.3f", loss.item())


def _row_losses(model, rows: list[Row], max_tokens: int = 512) -> torch.Tensor:
    """Weighted next-token cross-entropy summed per row, ``[len(rows)]``.

    Rows run in batches of similar length, right-padded (causal attention never looks right, so
    the padding needs no mask), at most ``max_tokens`` padded tokens a batch.
    """
    pad = model.config.pad_token_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    out: list[torch.Tensor] = [torch.zeros(())] * len(rows)
    while order:
        take = 1
        while take < len(order) and (take + 1) * len(rows[order[take]].ids) <= max_tokens:
            take += 1
        index, order = order[:take], order[take:]
        chunk = [rows[i] for i in index]
        width = len(chunk[-1].ids)
        fill = [width - len(r.ids) for r in chunk]
        input_ids = torch.tensor([r.ids + [pad] * n for r, n in zip(chunk, fill)])
        targets = torch.tensor([r.ids[1:] + [pad] * (n + 1) for r, n in zip(chunk, fill)])
        weights = torch.tensor([r.weights + [0.0] * n for r, n in zip(chunk, fill)])
        positions = torch.tensor([r.positions(width) for r in chunk])
        # RoPE pinned to what any prompt up to the training length gets, whatever the positions.
        logits = model(input_ids=input_ids, position_ids=positions, rope_length=model.config.training_seqlen,
                       use_cache=False).logits
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        for i, row_loss in zip(index, (losses * weights).sum(-1)):
            out[i] = row_loss
    return torch.stack(out)
