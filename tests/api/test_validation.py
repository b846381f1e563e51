"""Every bad input on the OpenAI routes gets a 4xx with ``{"error": {"message", "type", ...}}`` that says
what is wrong; none gets a 500, and the server keeps serving afterwards."""

from __future__ import annotations

import httpx
import pytest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HELLO = [{"role": "user", "content": "你好"}]

CASES = [
    # (id, path, body (dict = JSON, bytes = raw), status, words the message must contain)
    ("invalid-json", CHAT, b'{"messages": [', 400, "JSON"),
    ("body-not-object", CHAT, [1, 2], 400, "object"),
    ("messages-missing", CHAT, {"max_tokens": 4}, 400, "messages"),
    ("messages-wrong-type", CHAT, {"messages": "你好"}, 400, "messages"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages"),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("last-not-user", CHAT, {"messages": HELLO + [{"role": "assistant", "content": "hi"}],
                             "continue_final_message": False}, 400, "user message"),
    ("content-wrong-type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("temperature-wrong-type", CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("temperature-range", CHAT, {"messages": HELLO, "temperature": 3}, 400, "temperature"),
    ("top-p-range", CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("max-tokens-zero", CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-wrong-type", CHAT, {"messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max-tokens-beyond-context", CHAT, {"messages": HELLO, "max_tokens": 5000}, 400, "max_tokens"),
    ("max-completion-tokens-beyond-context", CHAT, {"messages": HELLO, "max_completion_tokens": 2047}, 400,
     "max_tokens"),
    ("prompt-beyond-context", CHAT, {"messages": [{"role": "user", "content": "测试 " * 3000}]}, 400, "context"),
    ("unknown-model", CHAT, {"messages": HELLO, "model": "gpt-4"}, 404, "gpt-4"),
    ("n-above-128", CHAT, {"messages": HELLO, "n": 129}, 400, "n"),
    ("too-many-stops", CHAT, {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stream-wrong-type", CHAT, {"messages": HELLO, "stream": "maybe"}, 400, "stream"),
    ("completion-prompt-missing", COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
    ("completion-prompt-empty", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("completion-token-out-of-vocab", COMPLETIONS, {"prompt": [10**9]}, 400, "token ids"),
    ("completion-negative-token", COMPLETIONS, {"prompt": [5, -1]}, 400, "token ids (integers >= 0)"),
    ("completion-bool-tokens", COMPLETIONS, {"prompt": [True]}, 400, "token ids"),
    ("deep-nesting", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff"}]}', 400, "UTF-8"),
    ("completion-beyond-context", COMPLETIONS, {"prompt": [5] * 2048}, 400, "context"),
    ("completion-unknown-model", COMPLETIONS, {"prompt": "hi", "model": "nope"}, 404, "nope"),
    ("oversize-body", CHAT, {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "limit"),
]


@pytest.mark.parametrize("path, body, status, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_4xx_with_reason(demo_server, path, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(demo_server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower(), err
    assert err["type"] and "code" in err


def test_oversize_body_refused_before_reading_it_all(demo_server):
    """A declared Content-Length over 1 MiB is refused from the header alone."""
    r = httpx.post(demo_server.url + CHAT, content=b"x" * ((1 << 20) + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_route_and_method(demo_server):
    assert httpx.get(demo_server.url + "/v1/nothing").status_code == 404
    r = httpx.get(demo_server.url + CHAT)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_server_still_serves_after_bad_inputs(demo_server):
    """No bad input above killed the engine: health is fine and a normal request works."""
    assert httpx.get(demo_server.url + "/health").json() == {"status": "ok"}
    r = httpx.post(demo_server.url + CHAT, json={"messages": HELLO, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert 'status="500"' not in httpx.get(demo_server.url + "/metrics").text
