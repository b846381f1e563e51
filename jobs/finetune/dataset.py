"""Conversations → token rows with loss masks, packing, and the batch collator.

Labels: ``-100`` on every prompt token (system, ``<_user>``, question, ``<_bot>``); the answer
tokens and its ``<_end>`` are the targets (the model shifts labels itself). Ids come from
:class:`telechat.chat_format.ChatFormat`, the one definition of the chat format.

Packing puts several conversations in one row of at most ``max_seq_len`` tokens. Each
conversation's ``position_ids`` restart at 0, which makes ``TelechatForCausalLM`` build a
block-diagonal causal mask: packed conversations never attend to each other and every token sees
exactly the positions and context it would see alone.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from jobs.finetune.data import DataError
from jobs.quiet import rank
from telechat.chat_format import ChatFormat
from telechat.records import Record

log = logging.getLogger(__name__)

IGNORE = -100
"""Label of tokens that carry no loss (the ``ignore_index`` of cross-entropy)."""


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation: ``input_ids`` and its ``labels`` (same length)."""

    input_ids: list[int]
    labels: list[int]


def encode(chat: ChatFormat, messages: list[dict[str, str]], max_len: int | None = None,
           overlong: str = "truncate") -> tuple[Sample | None, str]:
    """Tokenize one conversation with its loss mask; returns ``(sample, status)``.

    ``status`` is ``ok``, ``truncated`` (leading turns kept, or the first answer cut to fit) or
    ``dropped`` (``overlong="drop"``, or the first prompt alone does not fit ``max_len``).
    """
    ids: list[int] = []
    labels: list[int] = []
    for prompt, answer in chat.encode_turns(messages):
        if max_len is None or len(ids) + len(prompt) + len(answer) <= max_len:
            ids += prompt + answer
            labels += [IGNORE] * len(prompt) + answer
            continue
        if overlong == "drop":
            return None, "dropped"
        if not ids:  # the first turn alone is too long: cut its answer
            room = max_len - len(prompt)
            if room < 1:
                return None, "dropped"
            ids, labels = prompt + answer[:room], [IGNORE] * len(prompt) + answer[:room]
        return Sample(ids, labels), "truncated"
    return Sample(ids, labels), "ok"


def encode_all(chat: ChatFormat, conversations: list[Record], max_len: int, overlong: str) -> list[Sample]:
    """Tokenize every conversation (progress bar on rank 0); logs how many were truncated or dropped."""
    samples, status = [], Counter()
    for conv in tqdm(conversations, desc="tokenizing", unit="conv", mininterval=2.0, disable=rank() != 0):
        try:
            sample, state = encode(chat, conv.messages, max_len, overlong)
        except ValueError as e:  # the tokenizer lacks a marker, etc.
            raise DataError(f"{conv.source}: {e}") from e
        status[state] += 1
        if sample is not None:
            samples.append(sample)
    if status["truncated"] or status["dropped"]:
        log.warning("--max-seq-len %d: %d conversation(s) truncated, %d dropped (of %d)",
                    max_len, status["truncated"], status["dropped"], len(conversations))
    if not samples:
        raise DataError(f"every conversation is longer than --max-seq-len {max_len}; raise it")
    return samples


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indexes into bins of total length <= ``capacity`` (best-fit decreasing).

    Within a bin, indexes keep their input order so a shuffled input stays shuffled.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: smallest fitting room first
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return [sorted(b) for b in bins]


def build_rows(samples: list[Sample], max_len: int, packing: bool) -> list[dict[str, list[int]]]:
    """Training rows: one sample each, or packed samples with per-sample ``position_ids``."""
    groups = pack([len(s.input_ids) for s in samples], max_len) if packing else [[i] for i in range(len(samples))]
    rows = []
    for group in groups:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in group:
            row["input_ids"] += samples[i].input_ids
            row["labels"] += samples[i].labels
            row["position_ids"] += list(range(len(samples[i].input_ids)))
        rows.append(row)
    if packing:
        used = sum(len(r["input_ids"]) for r in rows)
        log.info("packed %d conversations into %d rows of <= %d tokens (%.0f%% full)",
                 len(samples), len(rows), max_len, 100 * used / (len(rows) * max_len))
    return rows


class RowDataset(torch.utils.data.Dataset):
    """A list of token rows as a map-style dataset (what the Trainer's sampler shuffles)."""

    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


class Collator:
    """Right-pads rows to the longest in the batch.

    Pads get ``IGNORE`` labels and positions that continue the row's last sample: being after
    every real token, they are invisible under causal attention, and since positions do not
    restart there, unpacked batches keep the fast plain-causal attention path.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            n = width - len(r["input_ids"])
            last = r["position_ids"][-1]
            batch["input_ids"].append(r["input_ids"] + [self.pad_id] * n)
            batch["labels"].append(r["labels"] + [IGNORE] * n)
            batch["position_ids"].append(r["position_ids"] + list(range(last + 1, last + 1 + n)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
