"""Calibration reading: official SFT, messages, text jsonl and plain text give chat-format ids;
the held-out tail never enters calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.quant.calib import calibration_records, load_calibration, load_heldout
from telechat.chat_format import ChatFormat
from telechat.errors import UserError


@pytest.fixture()
def chat(demo_tokenizer):
    return ChatFormat(demo_tokenizer, {})


def test_formats_share_the_chat_format(chat, tmp_path: Path):
    """An official sample and the same dialog as messages give the same ids; its rendered text as a
    document gives them too (markers read as markers), plus the eos every document ends with."""
    official = {"input": "<_user>你好", "output": "你好！今天过得怎么样？"}
    messages = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！今天过得怎么样？"}]}
    rendered = {"text": chat.render(messages["messages"], add_generation_prompt=False)}
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (official, messages, rendered)), encoding="utf-8")
    a, b, c = calibration_records(path, chat)
    assert a == b and c == a + [chat.tokenizer.eos_token_id]
    assert a[-1] == chat.end_id


def test_plain_text_windows_and_heldout(chat, tmp_path: Path):
    """Plain text is one stream: calibration windows come from the head, the tail is held out."""
    path = tmp_path / "corpus.txt"
    path.write_text("我想学习人工智能，应该从哪里开始？\n" * 200, encoding="utf-8")
    stream = calibration_records(path, chat)[0]
    data = load_calibration(path, chat, num_samples=4, seq_len=32)
    assert all(16 <= len(s) <= 32 for s in data.samples)
    assert data.heldout == stream[-len(data.heldout):] and len(data.heldout) >= len(stream) // 10


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_heldout_alone_is_the_calibration_split(chat, tmp_path: Path, suffix: str):
    """load_heldout (FP8 with dynamic scales calibrates nothing) returns the very tokens that
    load_calibration holds out, so GPTQ and FP8 reports on one file measure the same text."""
    path = tmp_path / f"corpus{suffix}"
    lines = [f"第{i}条：我想学习人工智能，应该从哪里开始？" for i in range(60)]
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) if suffix == ".jsonl" else t
                              for t in lines), encoding="utf-8")
    assert load_heldout(path, chat) == load_calibration(path, chat, num_samples=4, seq_len=32).heldout


def test_bad_record_names_the_line(chat, tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"prompt": "?"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        calibration_records(path, chat)


def test_every_bad_line_is_reported_with_its_column(chat, tmp_path: Path):
    """All bad lines of a calibration file are listed (line, JSON column), not only the first."""
    good = json.dumps({"text": "ok"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, '{"text": "a" "b"}', good, '["list"]', '{"text": "unterminated']) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError) as err:
        calibration_records(path, chat)
    message = str(err.value)
    assert message.startswith("3 malformed line(s)")
    assert f"{path}:2: not valid JSON at column 14: Expecting ',' delimiter" in message
    assert f"{path}:4: expected a JSON object, got list" in message
    assert f"{path}:5: not valid JSON at column 10: Unterminated string starting at" in message
