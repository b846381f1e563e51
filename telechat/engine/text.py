"""Token ids → streamed text for one request: incremental detokenization and stop strings.

Text that might be the beginning of a stop string is held back until it is known not to be,
so no stop string (or part of one) ever reaches the client.
"""

from __future__ import annotations

from telechat.detokenizer import IncrementalDetokenizer


class TextStream:
    """Turns one request's new token ids into text deltas; reports when a stop string appears."""

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_token_ids: list[int] | None = None,
                 prompt_ids: list[int] | None = None, min_tokens: int = 0, include_stop: bool = False):
        """``min_tokens``: stop strings are not looked for in the text of the first ``min_tokens`` tokens;
        ``include_stop``: the text keeps the stop string that ended it."""
        # Prompt ids as context make a raw continuation keep its leading space (SentencePiece).
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=True)
        self._stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._skip = set(skip_token_ids or [])
        self._pending = ""
        self._min_tokens = min_tokens
        self._include_stop = include_stop
        self._tokens = 0
        self._searchable = 0  # where in ``_pending`` stop strings may start (text of tokens past min_tokens)
        self.text = ""
        self.stopped = False

    def feed(self, token_ids: list[int], finished: bool = False) -> str:
        """Add new ids; return the text that may be shown now (all of it once ``finished``)."""
        if self.stopped:
            return ""
        self._pending += self._detok.push([t for t in token_ids if t not in self._skip])
        if finished:
            # A reply cut by max_tokens may end inside a multi-byte character: drop that fragment
            # rather than emit U+FFFD.
            self._pending += self._detok.flush().rstrip("\ufffd")
        self._tokens += len(token_ids)
        if self._tokens <= self._min_tokens:
            self._searchable = len(self._pending)
        cut = self._find_stop()
        if cut is not None:
            delta, self._pending, self.stopped = self._pending[:cut], "", True
        elif finished or not self._hold:
            delta, self._pending = self._pending, ""
        else:
            keep = min(self._hold, len(self._pending) - self._searchable)
            delta, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        self._searchable = max(0, self._searchable - len(delta))
        self.text += delta
        return delta

    def _find_stop(self) -> int | None:
        """Where the text to send ends: at (or, with ``include_stop``, after) the first stop string."""
        hits = [(i, i + len(s) if self._include_stop else i)
                for i, s in ((self._pending.find(s, self._searchable), s) for s in self._stop) if i >= 0]
        return min(hits)[1] if hits else None
