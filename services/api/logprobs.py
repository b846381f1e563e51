"""Log-probabilities in OpenAI's response shapes, from the per-token entries the engine returns
(``StreamDelta.logprobs``: token id, log-probability, top ids, top log-probabilities).

The values are the model's raw distribution (log-softmax of its logits before penalties, logit
bias and temperature), as vLLM returns by default (``logprobs_mode`` ``raw_logprobs``).
"""

from __future__ import annotations

import weakref

from services.api.protocol.openai import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

Entry = tuple[int, float, list[int], list[float]]


class TokenTexts:
    """The text of single tokens (as ``tokenizer.decode([id])`` spells it), cached per id: a token that is
    part of a character reads as U+FFFD, its ``bytes`` as UTF-8 of that text (what vLLM returns)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        """The text of ``token_id``."""
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(tokenizer) -> TokenTexts:
    """The :class:`TokenTexts` of ``tokenizer``, shared by the requests that use it."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


def _top(texts: TokenTexts, token_id: int, logprob: float) -> TopLogprob:
    text = texts(token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(entries: list[Entry], texts: TokenTexts) -> ChatLogprobs:
    """``choices[].logprobs`` of a chat reply (or of one streamed chunk)."""
    content = []
    for token, logprob, top_ids, top_lps in entries:
        own = _top(texts, token, logprob)
        content.append(TokenLogprob(token=own.token, logprob=own.logprob, bytes=own.bytes,
                                    top_logprobs=[_top(texts, i, lp) for i, lp in zip(top_ids, top_lps)]))
    return ChatLogprobs(content=content)


class CompletionLogprobsBuilder:
    """``choices[].logprobs`` of a completion, piece by piece: ``text_offset`` continues across the
    streamed chunks of one choice."""

    def __init__(self, texts: TokenTexts):
        self._texts = texts
        self._offset = 0

    def build(self, entries: list[Entry]) -> CompletionLogprobs:
        """The logprobs of the next ``entries`` of this choice."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token, logprob, top_ids, top_lps in entries:
            text = self._texts(token)
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append({self._texts(i): lp for i, lp in zip(top_ids, top_lps)})
            out.text_offset.append(self._offset)
            self._offset += len(text)
        return out
