"""The SSE reader: any split of the byte stream yields the same events and the same text."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from services.web.client import APIProtocolError, APIServerError, ChatStream
from services.web.sse import SSEEvent, SSEParser

TEXT_PIECES = ["你好", "，世界！", "🙂 emoji ", "mixed 中英 text", "\n```python\nprint('好')\n```\n", "。"]


def _chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {"content": content} if content is not None else {}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _stream_bytes(newline: str = "\n") -> bytes:
    """An OpenAI-style stream: role chunk, text chunks, finish chunk, usage chunk, [DONE]."""
    nl = newline
    events = [json.dumps(_chunk(""), ensure_ascii=False)]
    events += [json.dumps(_chunk(p), ensure_ascii=False) for p in TEXT_PIECES]
    events.append(json.dumps(_chunk(finish="stop")))
    events.append(json.dumps({"choices": [], "usage": {"completion_tokens": 7}}))
    body = f": keep-alive comment{nl}{nl}"
    body += "".join(f"data: {e}{nl}{nl}" for e in events)
    body += f"data: [DONE]{nl}{nl}"
    return body.encode("utf-8")


def _random_split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(60, len(data) - 1))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def _parse(chunks: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events = [e for c in chunks for e in parser.feed(c)]
    return events + parser.close()


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_random_splits_give_the_same_events(newline: str) -> None:
    """Events do not depend on where chunk boundaries fall (incl. inside CRLF and UTF-8)."""
    data = _stream_bytes(newline)
    whole = _parse([data])
    assert [e.data for e in whole][-1] == "[DONE]"
    assert len(whole) == len(TEXT_PIECES) + 4
    rng = random.Random(0)
    for _ in range(300):
        assert _parse(_random_split(data, rng)) == whole
    assert _parse([bytes([b]) for b in data]) == whole


def test_multibyte_character_split_across_chunks() -> None:
    """A 3-byte Chinese character and a 4-byte emoji cut mid-sequence decode intact."""
    data = "data: 中🙂\n\n".encode()
    for cut in range(1, len(data)):
        assert _parse([data[:cut], data[cut:]]) == [SSEEvent("中🙂")]


def test_fields_comments_and_multiline_data() -> None:
    data = b"\xef\xbb\xbf: hi\nevent: note\nid: 7\ndata:a\ndata:  b\nretry: 10\nbogus\n\n\ndata: c\n\n"
    for cut in range(len(data)):
        assert _parse([data[:cut], data[cut:]]) == [SSEEvent("a\n b", "note", "7"), SSEEvent("c", "message", "7")]


def test_close_delivers_an_unterminated_last_event() -> None:
    """A server that drops the final blank line still gets its last event read."""
    assert _parse([b"data: x\n\ndata: [DONE]"]) == [SSEEvent("x"), SSEEvent("[DONE]")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert _parse([b"\n\n\r\n: c\n\n"]) == []


def _chat_stream(chunks: list[bytes]) -> ChatStream:
    # A real httpx.Response over raw bytes: the same object the client gets from the network.
    return ChatStream(httpx.Response(200, content=iter(chunks)))


def test_chat_stream_text_is_the_concatenation_for_any_split() -> None:
    """Streamed deltas joined == the text the server sent; finish reason and usage are read."""
    data = _stream_bytes()
    rng = random.Random(1)
    for _ in range(100):
        stream = _chat_stream(_random_split(data, rng))
        assert "".join(stream) == "".join(TEXT_PIECES)
        assert stream.finish_reason == "stop"
        assert stream.usage == {"completion_tokens": 7}


def test_chat_stream_error_event_raises_server_error() -> None:
    err = json.dumps({"error": {"message": "engine died", "type": "server_error", "code": 500}})
    stream = _chat_stream([f"data: {json.dumps(_chunk('半'))}\n\ndata: {err}\n\n".encode()])
    with pytest.raises(APIServerError) as info:
        list(stream)
    assert info.value.detail == "engine died"


def test_chat_stream_cut_short_raises_protocol_error() -> None:
    stream = _chat_stream([f"data: {json.dumps(_chunk('半'))}\n\n".encode()])
    with pytest.raises(APIProtocolError):
        list(stream)


def test_chat_stream_bad_json_raises_protocol_error() -> None:
    with pytest.raises(APIProtocolError):
        list(_chat_stream([b"data: {not json\n\n"]))
