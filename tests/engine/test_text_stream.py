"""TextStream's stop-string options (issue 18): ``min_tokens`` and ``include_stop`` (the demo tokenizer:
one token per character)."""

from __future__ import annotations

from telechat.engine.text import TextStream


def feed_all(stream: TextStream, ids: list[int]) -> str:
    """Feed one id at a time, the last one as finished; the text sent."""
    return "".join(stream.feed([t], finished=i == len(ids) - 1) for i, t in enumerate(ids))


def test_stop_string_cut_and_kept(demo_tokenizer):
    ids = demo_tokenizer.encode("你好，世界。再见", add_special_tokens=False)
    assert feed_all(TextStream(demo_tokenizer, ["世界"]), ids) == "你好，"
    kept = TextStream(demo_tokenizer, ["世界"], include_stop=True)
    assert feed_all(kept, ids) == "你好，世界" and kept.stopped


def test_min_tokens_ignores_stop_strings_in_the_first_tokens(demo_tokenizer):
    text = "好的好的，好的。"
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert feed_all(TextStream(demo_tokenizer, ["好的"]), ids) == ""
    late = TextStream(demo_tokenizer, ["好的"], min_tokens=3)  # "好的好" is not searched; the next "好的" is
    assert feed_all(late, ids) == "好的好的，"
    never = TextStream(demo_tokenizer, ["好的"], min_tokens=len(ids))
    assert feed_all(never, ids) == text and not never.stopped
