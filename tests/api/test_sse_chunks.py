"""The streamed text chunk template renders exactly what pydantic renders, for any text."""

from __future__ import annotations

import random

import pytest

from services.api.protocol.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from services.api.serving import sse_json, text_chunks

rng = random.Random(0)
TEXTS = ["hi", "", "\n\t\"\\/", "\x00\x01\x1f\x7f", "中文\u2028\u2029\x85", "emoji 😀", "</script>", "e\u0301",
         "\x00telechat-text\x00"] + \
    ["".join(chr(rng.randrange(0, 0x3000)) for _ in range(24)) for _ in range(300)]


def chat(text: str, exclude) -> str:
    return sse_json(ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", usage=None,
                                        choices=[ChatChunkChoice(delta=DeltaMessage(content=text))]
                                        ).model_dump_json(exclude=exclude))


def completion(text: str, exclude) -> str:
    return sse_json(CompletionResponse(id="cmpl-1", created=1, model="m", usage=None,
                                       choices=[CompletionChoice(text=text, finish_reason=None)]
                                       ).model_dump_json(exclude=exclude))


@pytest.mark.parametrize("render", [chat, completion])
@pytest.mark.parametrize("exclude", [None, {"usage"}], ids=["with-usage", "without-usage"])
def test_text_chunks_equal_pydantic(render, exclude):
    fast = text_chunks(lambda text: render(text, exclude))
    for text in TEXTS:
        assert fast(text) == render(text, exclude), repr(text)
