"""OpenAI-compatible routes through the official ``openai`` client and raw HTTP: schema, SSE framing,
stream == non-stream, stop strings, batching invariance, streamed Chinese + emoji text."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from tests.api.conftest import LOOP_TEXT

HELLO = [{"role": "user", "content": "你好"}]


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def model_id(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, asserting the exact framing ``data: X\\n\\n``."""
    assert body.endswith("\n\n") and "\r" not in body
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def test_models_lists_served_model_with_extensions(demo_server):
    """/v1/models: OpenAI list of one model plus max_model_len, telechat_demo and generation_defaults."""
    body = httpx.get(demo_server.url + "/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["object"] == "model" and card["id"] == "telechat-demo" and isinstance(card["created"], int)
    assert card["telechat_demo"] is True and card["max_model_len"] == 2048
    assert set(card["generation_defaults"]) == {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                                "max_tokens"}
    assert client(demo_server).models.list().data[0].id == "telechat-demo"


def test_openai_client_stream_joins_to_non_stream(demo_server):
    """Official client: streamed deltas join to the non-streamed text; role first, usage last, same counts
    (cached prompt tokens may differ: the second request can reuse the first one's prefix)."""
    c, model = client(demo_server), model_id(demo_server)
    full = c.chat.completions.create(model=model, messages=HELLO, max_tokens=48, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(c.chat.completions.create(model=model, messages=HELLO, max_tokens=48, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens)
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


def test_sse_framing_is_exact(demo_server):
    """Raw bytes: ``data: {json}\\n\\n`` per chunk, role chunk first, ``{}`` delta with finish_reason,
    usage chunk with ``choices: []``, then ``data: [DONE]``; no usage key without include_usage."""
    req = {"messages": HELLO, "max_tokens": 8, "stream": True}
    r = httpx.post(demo_server.url + "/v1/chat/completions", json=req, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    r = httpx.post(demo_server.url + "/v1/chat/completions", timeout=60,
                   json={**req, "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_completions_stream_and_not(demo_server):
    """/v1/completions: text and token-id prompts, stream joins to non-stream, max_tokens respected."""
    c, model = client(demo_server), model_id(demo_server)
    full = c.completions.create(model=model, prompt="中国的首都是", max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens <= 12
    parts = list(c.completions.create(model=model, prompt="中国的首都是", max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    ids = c.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_stop_string_cuts_text(demo_server):
    """A stop string ends the reply before it (finish_reason stop), streamed or not."""
    c, model = client(demo_server), model_id(demo_server)
    text = c.chat.completions.create(model=model, messages=HELLO, max_tokens=40, temperature=0).choices[0].message.content
    assert len(text) > 6
    stop = text[3:5]
    cut = c.chat.completions.create(model=model, messages=HELLO, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_greedy_equals_sequential(demo_server):
    """16 greedy requests at once (one batch) give exactly what each gives alone."""
    c, model = client(demo_server), model_id(demo_server)
    prompts = [f"第{i}个问题：{'请介绍一下你自己' if i % 2 else 'What can you do?'} {i}" for i in range(16)]

    def ask(p: str) -> str:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=24,
                                      temperature=0)
        return r.choices[0].message.content

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


@pytest.mark.parametrize("loops", [8])
def test_chinese_emoji_stream_deltas_join_without_replacement(loop_server, loops):
    """Real 12B tokenizer, byte-fallback emoji: every streamed delta is whole characters, the deltas join
    to the non-streamed text, and no U+FFFD appears anywhere."""
    n_tokens = 17 * loops  # LOOP_TEXT is 17 tokens: end on a loop boundary
    c, model = client(loop_server), model_id(loop_server)
    full = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "说点什么"}],
                                     max_tokens=n_tokens).choices[0].message.content
    assert full.count("🌞") == loops and full.count("😀") == loops and LOOP_TEXT in full
    deltas = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "说点什么"}], max_tokens=n_tokens, stream=True)
        if ch.choices and ch.choices[0].delta.content]
    assert "".join(deltas) == full
    assert not any("\ufffd" in d for d in deltas) and "\ufffd" not in full
    assert "🌞" in deltas or any("🌞" in d for d in deltas)
