"""Tokenizers: official 12B SentencePiece (slow + fast), 7B-style demo BPE, AutoTokenizer wiring."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from telechat.tokenizer import (
    TelechatTokenizer,
    TelechatTokenizerFast,
    build_demo_tokenizer,
    load_tokenizer,
)

from .conftest import REF as REF_DIR

SAMPLES = [
    "你好，世界！",
    "Hello world, how are you?",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "emoji 😀🎉👨‍👩‍👧 and rare 𠀀𠀁 characters",
    "def f(x):\n    return x * 2  # 注释\n",
    "数字 1234567890 和 3.14159，电话 010-12345678",
    "__init__ ___ ____ <reserve1> <0x41> <_unk>",
    "¿Dónde está? Grüße, こんにちは, 안녕하세요",
    "",
]
SPECIAL_SAMPLES = ["a<_end>b", "<_start>x", "<_system>系统<_user>问<_bot>答<_end><_user>再问<_bot>", "<_user>\n12"]


def _sft_texts(limit: int = 150) -> list[str]:
    """A few hundred varied texts from the official SFT examples (questions and answers)."""
    texts: list[str] = []
    for name in ("multi_turn_example.jsonl", "single_turn_example.jsonl", "test.jsonl"):
        with open(REF_DIR / "sft-data" / name, encoding="utf-8") as f:
            for _, line in zip(range(limit), f):
                row = json.loads(line)
                texts += [row["input"]] + ([row["output"]] if row.get("output") else [])
    return texts


def test_special_ids(tokenizer_12b, tokenizer_12b_slow):
    """The markers and control tokens keep the ids of tokenizer.model: <_user> 20, <_bot> 21, <_end> 2, <_system> 22."""
    for tok in (tokenizer_12b, tokenizer_12b_slow):
        ids = tok.convert_tokens_to_ids(["<_user>", "<_bot>", "<_end>", "<_system>", "<_pad>", "<_start>"])
        assert ids == [20, 21, 2, 22, 3, 1]
        assert tok.eos_token_id == 2 and tok.pad_token_id == 3
        assert tok.encode("<_user>你好<_bot>") == [20] + tok.encode("你好") + [21]
        assert tok.encode("<_system>", add_special_tokens=False) == [22]
        assert len(tok) == 120000


def test_no_bos_eos_by_default(tokenizer_12b, tokenizer_12b_slow):
    """The official config has add_bos_token/add_eos_token false: tokenizer(text) adds nothing."""
    for tok in (tokenizer_12b, tokenizer_12b_slow):
        assert tok.encode("你好") == tok.encode("你好", add_special_tokens=False)


def test_bos_eos_when_enabled(tokenizer_12b_dir):
    """add_bos_token/add_eos_token wrap each sequence as bos + ids + eos, slow and fast alike."""
    slow = TelechatTokenizer.from_pretrained(str(tokenizer_12b_dir), add_bos_token=True, add_eos_token=True)
    fast = TelechatTokenizerFast.from_pretrained(str(tokenizer_12b_dir), add_bos_token=True, add_eos_token=True)
    plain = slow.encode("你好", add_special_tokens=False)
    assert slow.encode("你好") == fast.encode("你好") == [1] + plain + [2]


def test_slow_matches_sentencepiece(tokenizer_12b_slow, tokenizer_12b_dir):
    """On text without special tokens the slow tokenizer gives exactly SentencePiece's ids."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_12b_dir / "tokenizer.model"))
    for text in SAMPLES[:-1] + _sft_texts(40):
        plain = text.replace("<_user>", "").replace("<_bot>", "").replace("<_start>", "")
        assert tokenizer_12b_slow.encode(plain) == sp.encode(plain), plain[:60]


def test_slow_equals_fast(tokenizer_12b, tokenizer_12b_slow):
    """Slow and fast give identical ids and identical decodes (with and without special tokens)."""
    for text in SAMPLES + SPECIAL_SAMPLES + _sft_texts():
        ids = tokenizer_12b_slow.encode(text)
        assert tokenizer_12b.encode(text) == ids, text[:60]
        for skip in (False, True):
            assert tokenizer_12b.decode(ids, skip_special_tokens=skip) == tokenizer_12b_slow.decode(
                ids, skip_special_tokens=skip
            )


@pytest.mark.parametrize("which", ["tokenizer_12b", "tokenizer_12b_slow", "demo_tokenizer"])
def test_round_trip(which, request):
    """decode(encode(text)) == text for Chinese, English, emoji, code, whitespace and newlines."""
    tok = request.getfixturevalue(which)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_byte_fallback_decode(tokenizer_12b, tokenizer_12b_slow):
    """Byte-fallback pieces re-assemble into UTF-8; an invalid run becomes one U+FFFD per byte."""
    ids = tokenizer_12b_slow.encode("𠀀")
    assert all(123 <= i <= 378 for i in ids[1:])  # <0x..> pieces
    for tok in (tokenizer_12b, tokenizer_12b_slow):
        assert tok.decode(ids) == "𠀀"
        assert tok.decode(ids[:-1]) == "\ufffd" * (len(ids) - 2)


def test_auto_tokenizer_official_folder(tokenizer_12b_dir, tmp_path):
    """AutoTokenizer loads the official 12B folder (remote auto_map absent) without trust_remote_code,
    with or without the official config.json next to it."""
    import telechat  # noqa: F401

    tok = AutoTokenizer.from_pretrained(str(tokenizer_12b_dir))
    assert isinstance(tok, TelechatTokenizerFast)
    folder = tmp_path / "12b"
    shutil.copytree(tokenizer_12b_dir, folder)
    shutil.copy(REF_DIR / "configs/12B/config.json", folder / "config.json")
    assert isinstance(load_tokenizer(folder), TelechatTokenizerFast)


def test_fast_save_reload(tokenizer_12b, tmp_path):
    """A saved fast tokenizer (tokenizer.json) reloads with the same ids."""
    tokenizer_12b.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SAMPLES:
        assert again.encode(text) == tokenizer_12b.encode(text)


def test_load_tokenizer_missing_files(tmp_path):
    """load_tokenizer names the folder and the expected files when neither exists."""
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_demo_tokenizer_7b_style(demo_tokenizer_dir, demo_tokenizer):
    """The demo tokenizer is a 7B-style byte-level BPE folder with the TeleChat specials at fixed ids."""
    config = json.loads((demo_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BloomTokenizerFast"
    ids = demo_tokenizer.convert_tokens_to_ids(["<unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>"])
    assert ids == list(range(7))
    text = "<_system>系统<_user>你好😊<_bot>好的🎉<_end>"
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert demo_tokenizer.decode(ids) == text
    assert demo_tokenizer.decode(ids, skip_special_tokens=True) == "系统你好😊好的🎉"


def test_demo_tokenizer_returns_ids_and_is_deterministic(tmp_path):
    """build_demo_tokenizer returns the generation-config ids and trains the same vocabulary twice."""
    a = build_demo_tokenizer(tmp_path / "a")
    b = build_demo_tokenizer(tmp_path / "b")
    assert a == b == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "user_token_id": 4, "bot_token_id": 5}
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_7b_official_configs_load(demo_tokenizer_dir, tmp_path):
    """A 7B folder (official tokenizer_config/special_tokens_map + config.json, BPE tokenizer.json) loads."""
    import telechat  # noqa: F401

    folder = tmp_path / "7b"
    folder.mkdir()
    shutil.copy(demo_tokenizer_dir / "tokenizer.json", folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(REF_DIR / "configs/7B" / name, folder)
    tok = load_tokenizer(folder)
    assert tok.padding_side == "left" and tok.eos_token == "<_end>"
    assert tok.decode(tok.encode("你好，世界 😀", add_special_tokens=False)) == "你好，世界 😀"


def test_demo_corpus_is_packaged():
    """The demo corpus ships as package data and is bilingual."""
    from telechat.tokenizer import demo_corpus

    text = demo_corpus()
    assert len(text) > 2000 and "你好" in text and "Hello" in text
