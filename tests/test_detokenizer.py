"""IncrementalDetokenizer: streamed deltas concatenate to the full decode and never split a character."""

from __future__ import annotations

import random

import pytest

from telechat.detokenizer import IncrementalDetokenizer

TEXT = (
    "你好，世界！今天天气很好😀🎉。 Hello  world,\n\n  code: def f(x):\n\treturn x * 2  # 注释\n"
    "罕见字 𠀀𠀁 家庭 👨‍👩‍👧 旗帜 🇨🇳 数字 12345，3.14 末尾。  "
)
TOKENIZERS = ["tokenizer_12b", "tokenizer_12b_slow", "demo_tokenizer"]


def _stream(det: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5)
        out.append(det.push(ids[i : i + n]))
        i += n
    return out + [det.flush()]


@pytest.mark.parametrize("which", TOKENIZERS)
def test_stream_concat_equals_full_decode(which, request):
    """For random slices of Chinese/emoji/code text (special tokens mixed in) and random chunk sizes,
    concat(deltas) == decode(all ids) and no delta contains U+FFFD."""
    tok = request.getfixturevalue(which)
    end_id = tok.convert_tokens_to_ids("<_end>")
    for seed in range(120):
        rng = random.Random(seed)
        a = rng.randrange(len(TEXT))
        ids = tok.encode(TEXT[a : rng.randrange(a, len(TEXT) + 1)], add_special_tokens=False)
        if seed % 3 == 0:
            ids += [end_id] + tok.encode("继续 more", add_special_tokens=False)
        for skip in (True, False):
            deltas = _stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, rng)
            assert all("\ufffd" not in d for d in deltas)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), (seed, skip)


@pytest.mark.parametrize("which", TOKENIZERS)
def test_byte_by_byte_characters_wait(which, request):
    """A character split over several byte tokens is emitted only once complete."""
    tok = request.getfixturevalue(which)
    ids = tok.encode("𠀀好", add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    deltas = [det.push([t]) for t in ids] + [det.flush()]
    assert "".join(deltas) == "𠀀好"
    assert all(d in ("", "𠀀", "好", "𠀀好") for d in deltas)


def test_invalid_bytes_come_out_at_flush(tokenizer_12b):
    """An incomplete character at the end is held back by push and released by flush, like decode."""
    ids = tokenizer_12b.encode("好𠀀", add_special_tokens=False)[:-1]
    det = IncrementalDetokenizer(tokenizer_12b)
    assert det.push(ids[:1]) == "好"
    assert det.push(ids[1:]) == ""
    assert det.flush() == tokenizer_12b.decode(ids)[1:] == "\ufffd" * (len(ids) - 1)


@pytest.mark.parametrize("which", TOKENIZERS)
def test_prompt_context_continuation(which, request):
    """With prompt_ids the deltas are the text added after the prompt: decode(prompt+ids) minus decode(prompt)."""
    tok = request.getfixturevalue(which)
    for seed in range(50):
        rng = random.Random(seed)
        cut = rng.randrange(1, len(TEXT))
        while TEXT[cut - 1] in " \n\t" and cut > 1:  # a prompt ending in spaces can merge with the reply
            cut -= 1
        prompt = tok.encode("前文：" + TEXT[:cut], add_special_tokens=False)
        ids = tok.encode(TEXT[cut:], add_special_tokens=False)
        deltas = _stream(IncrementalDetokenizer(tok, prompt_ids=prompt), ids, rng)
        expected = tok.decode(prompt + ids, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)) :]
        assert "".join(deltas) == expected
        assert all("\ufffd" not in d for d in deltas)


def test_window_stays_small(tokenizer_12b):
    """Work per push is O(window): the kept window does not grow with the generated length."""
    ids = tokenizer_12b.encode(TEXT * 20, add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer_12b)
    longest = 0
    for t in ids:
        det.push([t])
        longest = max(longest, len(det._window))
    assert longest <= 8
