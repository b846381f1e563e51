"""Calibration reading: official SFT, messages, text jsonl and plain text give chat-format ids;
the held-out tail never enters calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.quant.calib import CalibrationError, load_calibration, read_records
from telechat.chat_format import ChatFormat


@pytest.fixture()
def chat(demo_tokenizer):
    return ChatFormat(demo_tokenizer, {})


def test_formats_share_the_chat_format(chat, tmp_path: Path):
    """An official sample, the same dialog as messages, and its rendered text give the same ids."""
    official = {"input": "<_user>你好", "output": "你好！今天过得怎么样？"}
    messages = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！今天过得怎么样？"}]}
    rendered = {"text": chat.render(messages["messages"], add_generation_prompt=False)}
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (official, messages, rendered)), encoding="utf-8")
    a, b, c = read_records(path, chat)
    assert a == b == c
    assert a[-1] == chat.end_id


def test_plain_text_windows_and_heldout(chat, tmp_path: Path):
    """Plain text is one stream: calibration windows come from the head, the tail is held out."""
    path = tmp_path / "corpus.txt"
    path.write_text("我想学习人工智能，应该从哪里开始？\n" * 200, encoding="utf-8")
    stream = read_records(path, chat)[0]
    data = load_calibration(path, chat, num_samples=4, seq_len=32)
    assert all(16 <= len(s) <= 32 for s in data.samples)
    assert data.heldout == stream[-len(data.heldout):] and len(data.heldout) >= len(stream) // 10


def test_bad_record_names_the_line(chat, tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"prompt": "?"}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2"):
        read_records(path, chat)
