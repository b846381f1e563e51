"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character.

Same scheme as vLLM / TGI: keep a small window of ids ``[prefix | unread]``, decode the window with
and without the unread part, and emit the difference once it does not end in U+FFFD (an
incomplete byte-fallback / byte-level character). Each push costs O(window), not O(generated).

SentencePiece tokenizers drop one leading space at the very start of a decode (the dummy
prefix), so a window that does not start at the true start of the text is decoded behind an
*anchor* token (``"a"``) whose text is then cut off; that keeps the spaces the full decode keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_CONTEXT = 5
"""Prompt tokens kept as left context when ``prompt_ids`` is given (as vLLM does)."""


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas.

    Contract: with ``prompt_ids=None``, ``"".join(push(...) for each chunk) + flush()`` equals
    ``tokenizer.decode(all_pushed_ids, skip_special_tokens=skip_special_tokens)``, and no delta
    ends inside a UTF-8 character. With ``prompt_ids``, the deltas are the text the pushed ids add
    after the prompt (``decode(prompt + ids)`` minus ``decode(prompt)``), which keeps a leading
    space a SentencePiece continuation starts with: use it for raw completions, not for chat
    answers (whose text is ``decode(answer_ids)``). Assumes ``clean_up_tokenization_spaces`` off,
    as in every TeleChat tokenizer (that clean-up is not incremental).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A fast (Rust) tokenizer is called directly: the transformers wrapper costs ~10x the decode itself,
        # and two decodes run per streamed token (clean-up of tokenization spaces, the wrapper's only other
        # step, is off in every TeleChat tokenizer).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else \
            getattr(backend, "decode", None)
        prompt = list(prompt_ids or [])
        self._window: list[int] = prompt[-PROMPT_CONTEXT:]  # ids from the prefix offset on
        self._read = len(self._window)  # window index where the not-yet-emitted ids start
        self._at_start = len(self._window) == len(prompt)  # window starts at the true text start
        self._anchor = list(tokenizer.encode("a", add_special_tokens=False))
        self._anchor_len = len(self._decode_raw(self._anchor))

    def _decode_raw(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        if self._at_start:
            return self._decode_raw(ids)
        return self._decode_raw(self._anchor + ids)[self._anchor_len :]

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; return the newly completed text ("" while a character is incomplete)."""
        self._window.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        if self._read:
            # Slide: the emitted ids become the next prefix; the window no longer starts the text.
            self._window = self._window[self._read :]
            self._at_start = False
        self._read = len(self._window)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back at the end (an invalid byte run comes out as U+FFFD)."""
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        self._read = len(self._window)
        return new_text[len(prefix_text) :]
