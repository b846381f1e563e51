"""Loss masks, truncation, packing and the collator, on the official SFT examples."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.finetune.data import read_jsonl
from jobs.finetune.dataset import IGNORE, Collator, build_rows, encode, pack
from telechat.chat_format import ChatFormat
from telechat.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def chat(tiny_model_dir) -> ChatFormat:
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    return ChatFormat(load_tokenizer(tiny_model_dir), generation)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_loss_mask_counts_only_answers_and_end(chat: ChatFormat, official_sft, kind: str):
    """Prompt tokens (<_user>, question, <_bot>) carry -100; every answer token and its <_end> is a target."""
    conversations = read_jsonl(official_sft[kind])[:50]
    for conv in conversations:
        sample, status = encode(chat, conv.messages)
        assert status == "ok"
        answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        # Walk the row: every <_bot> opens an answer that runs to and including the next <_end>.
        targets, in_answer, expected = [], False, []
        for tok, lab in zip(sample.input_ids, sample.labels):
            if tok == chat.bot_id and not in_answer:
                assert lab == IGNORE, conv.source
                in_answer = True
                continue
            if in_answer:
                assert lab == tok, f"{conv.source}: answer token not counted"
                targets.append(tok)
                if tok == chat.end_id:
                    in_answer = False
            else:
                assert lab == IGNORE, f"{conv.source}: prompt token counted"
        for answer in answers:
            expected += chat.ids(answer) + [chat.end_id]
        assert targets == expected, conv.source
        assert sum(lab == chat.end_id for lab in sample.labels) == len(answers)
        assert not any(lab in (chat.user_id, chat.bot_id) for lab in sample.labels)


def test_truncate_keeps_leading_turns_and_drop_skips(chat: ChatFormat, official_sft):
    """Over-long multi-turn: 'truncate' keeps whole leading turns; a first turn too long gets its answer cut."""
    conv = next(c for c in read_jsonl(official_sft["multi"]) if len(c.messages) >= 6)
    full, _ = encode(chat, conv.messages)
    first_two = encode(chat, conv.messages[:4])[0]
    cut, status = encode(chat, conv.messages, max_len=len(first_two.input_ids) + 1)
    assert status == "truncated" and cut == first_two
    assert encode(chat, conv.messages, max_len=len(full.input_ids) - 1, overlong="drop") == (None, "dropped")
    prompt_len = len(chat.encode_turns(conv.messages)[0][0])
    short, status = encode(chat, conv.messages, max_len=prompt_len + 3)
    assert status == "truncated" and len(short.input_ids) == prompt_len + 3
    assert sum(lab != IGNORE for lab in short.labels) == 3
    assert encode(chat, conv.messages, max_len=prompt_len) == (None, "dropped")


def test_pack_respects_capacity_and_keeps_every_item():
    lengths = [5, 9, 3, 7, 1, 10, 2, 8, 4, 6]
    bins = pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 6  # total 55 -> at least 6 bins of 10; best-fit reaches it
    assert all(b == sorted(b) for b in bins)


def test_packed_rows_restart_positions_and_collator_pads(chat: ChatFormat, official_sft):
    """Packed rows hold every sample once, each with positions 0..n-1; pads get IGNORE labels and
    positions that continue the row (so they never start a new attention block)."""
    samples = [encode(chat, c.messages, 96)[0] for c in read_jsonl(official_sft["single"])[:12]]
    rows = build_rows(samples, 256, packing=True)
    assert len(rows) < len(samples)
    seen = []
    for row in rows:
        assert len(row["input_ids"]) <= 256
        pos = row["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            assert pos[a:b] == list(range(b - a))
            seen.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])))
    assert sorted(seen) == sorted((tuple(s.input_ids), tuple(s.labels)) for s in samples)

    short, long = sorted(rows, key=lambda r: len(r["input_ids"]))[::len(rows) - 1]
    batch = Collator(pad_id=chat.tokenizer.pad_token_id)([short, long])
    n, width = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == (2, width) and batch["input_ids"].dtype == torch.long
    assert (batch["input_ids"][0, n:] == chat.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE).all()
    last = short["position_ids"][-1]
    assert batch["position_ids"][0, n:].tolist() == list(range(last + 1, last + 1 + width - n))
