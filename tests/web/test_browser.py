"""The chat page in headless Chromium against the real API serving the demo model, on loopback.

Each test opens a fresh browser context, hence a fresh Streamlit session and conversation.
"""

from __future__ import annotations

import json
import re
import secrets
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.web.conftest import OUTPUT

pytestmark = pytest.mark.browser

API_KEY = "web-test-" + secrets.token_hex(8)
LONG_PROMPT = "Keep writing forever"  # the demo model is trained to keep writing on it until max tokens
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def api(browser, demo_model_dir, api_server):
    """The real API over the demo model, with a bearer token the page must pass on."""
    return api_server(demo_model_dir, env={"API_KEY": API_KEY})


@pytest.fixture(scope="module")
def web(api, web_server):
    return web_server(api.url, env={"API_KEY": API_KEY})


def _open(browser, url: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_test_id("stChatInputTextArea").wait_for()
    _wait_idle(page)
    return context, page


@pytest.fixture
def page(browser, web):
    context, page = _open(browser, web.url)
    yield page
    context.close()


# ---------------------------------------------------------------------------- helpers


def _wait_idle(page) -> None:
    """Wait until the Streamlit script run has finished (the page is settled)."""
    page.wait_for_function(
        "() => document.querySelector('[data-testid=stApp]')?.dataset.testScriptState === 'notRunning'")


def _visible(page, text: str) -> bool:
    """Some text is on screen (a badge with help text also has a hidden copy)."""
    return any(el.is_visible() for el in page.get_by_text(text).all())


def _send(page, text: str) -> None:
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def _messages(page):
    return page.get_by_test_id("stChatMessage")


def _reply_text(page, index: int) -> str:
    return _messages(page).nth(index).get_by_test_id("stMarkdownContainer").first.inner_text()


def _wait_reply(page, count: int) -> str:
    """Wait for `count` chat messages and a settled page; return the last message's text."""
    page.wait_for_function(
        f"() => document.querySelectorAll('[data-testid=stChatMessage]').length === {count}")
    _wait_idle(page)
    return _reply_text(page, count - 1)


def _set_max_tokens(page, value: int) -> None:
    field = page.get_by_label("最大生成长度（token）")
    if not field.is_visible():
        page.get_by_text("生成参数").click()  # the sidebar expander starts collapsed
    field.fill(str(value))
    field.press("Enter")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('input')].some(i => i.value === '{value}')")
    _wait_idle(page)


def _running(api) -> float:
    text = httpx.get(api.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).text
    match = re.search(r"^telechat:num_requests_running(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert match, "telechat:num_requests_running missing from /metrics"
    return float(match.group(1))


def _api_reply(api, prompt: str, **params) -> str:
    """The API's own non-streamed reply with the page's default (served) parameters."""
    model = httpx.get(api.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]
    d = model["generation_defaults"]
    body = {"model": model["id"], "messages": [{"role": "user", "content": prompt}],
            "temperature": d["temperature"] if d["do_sample"] else 0.0, "top_p": d["top_p"], "top_k": d["top_k"],
            "repetition_penalty": d["repetition_penalty"], "max_tokens": d["max_tokens"], **params}
    resp = httpx.post(api.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    return resp.json()["choices"][0]["message"]["content"]


def _normalize(text: str) -> str:
    return re.sub(r"\s+", "", text)


# ---------------------------------------------------------------------------- tests


def test_chinese_message_streams_reply(page, api) -> None:
    """A Chinese question gets the API's reply, assembled intact from the stream; Clear empties the chat;
    code blocks render; the screenshot of the page is the CI artifact."""
    assert _visible(page, "演示模型")
    assert _visible(page, "API 已就绪")
    _send(page, "你好")
    reply = _wait_reply(page, 2)
    assert _reply_text(page, 0) == "你好"
    assert reply.strip()
    assert _normalize(reply) == _normalize(_api_reply(api, "你好"))
    page.get_by_role("button", name="清空对话").click()
    page.wait_for_function("() => !document.querySelector('[data-testid=stChatMessage]')")
    _wait_idle(page)
    _send(page, "用 Python 打印你好")  # as a first turn the demo model answers with a code block
    _wait_reply(page, 2)
    assert 'print("你好")' in _messages(page).nth(1).get_by_test_id("stCode").inner_text()
    assert API_KEY not in page.content()
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-chat.png"), full_page=True)


def test_stop_keeps_partial_reply_and_aborts_generation(page, api) -> None:
    """Stop mid-reply: the text stops growing, is kept, and the API stops generating."""
    _set_max_tokens(page, 2000)
    _send(page, LONG_PROMPT)
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('[data-testid=stChatMessage]');"
        " return m.length === 2 && m[1].querySelector('[data-testid=stMarkdownContainer]').innerText.length > 20; }")
    assert _running(api) == 1, "the reply finished before Stop could be pressed"
    page.get_by_role("button", name="停止生成").click()
    page.get_by_text("已停止生成").wait_for()
    _wait_idle(page)
    partial = _reply_text(page, 1)
    time.sleep(1.0)
    assert _reply_text(page, 1) == partial, "the reply kept growing after Stop"
    assert len(partial) > 20
    deadline = time.monotonic() + 10
    while _running(api) != 0:
        assert time.monotonic() < deadline, "the API kept generating after Stop"
        time.sleep(0.1)
    assert len(_messages(page).all()) == 2


def test_regenerate_replaces_the_answer(page) -> None:
    """Regenerate swaps the last answer for a new one instead of adding a turn."""
    _set_max_tokens(page, 4)
    _send(page, "你好")
    first = _wait_reply(page, 2)
    _set_max_tokens(page, 64)
    page.get_by_role("button", name="重新生成").click()
    page.wait_for_function(
        "(old) => { const m = document.querySelectorAll('[data-testid=stChatMessage]');"
        " return m.length === 2 && m[1].querySelector('[data-testid=stMarkdownContainer]').innerText !== old; }",
        arg=first)
    _wait_idle(page)
    second = _reply_text(page, 1)
    assert len(_messages(page).all()) == 2
    assert len(second) > len(first)


def test_export_json_and_markdown_hold_all_turns(page) -> None:
    """The JSON download is valid and lists every turn in order; the Markdown one shows them too."""
    _send(page, "你好")
    _wait_reply(page, 2)
    _send(page, "介绍一下你自己")
    _wait_reply(page, 4)
    shown = [_reply_text(page, i) for i in range(4)]
    with page.expect_download() as info:
        page.get_by_test_id("stDownloadButton").filter(has_text="JSON").get_by_role("button").click()
    doc = json.loads(open(info.value.path(), encoding="utf-8").read())
    assert info.value.suggested_filename.endswith(".json")
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in doc["messages"]][::2] == ["你好", "介绍一下你自己"]
    for got, seen in zip(doc["messages"], shown):
        assert _normalize(got["content"]) == _normalize(seen)
    assert doc["model"] and doc["parameters"]["max_tokens"] > 0
    with page.expect_download() as info:
        page.get_by_test_id("stDownloadButton").filter(has_text="Markdown").get_by_role("button").click()
    markdown = open(info.value.path(), encoding="utf-8").read()
    assert markdown.count("## 用户") == 2 and "介绍一下你自己" in markdown


def test_api_down_shows_friendly_message(browser, web_server) -> None:
    """With nothing at API_URL the page says so in a sentence and keeps what the user typed."""
    dead = web_server(f"http://127.0.0.1:{free_port()}")
    context, page = _open(browser, dead.url)
    try:
        assert _visible(page, "API 不可用")
        _send(page, "你好")
        page.get_by_test_id("stAlertContentError").wait_for()
        _send(page, "有人吗？")
        page.wait_for_function("() => document.querySelectorAll('[data-testid=stChatMessage]').length === 2")
        _wait_idle(page)
        alert = page.get_by_test_id("stAlertContentError").inner_text()
        assert "无法连接到 API" in alert
        assert [_reply_text(page, i) for i in range(2)] == ["你好", "有人吗？"]
        assert "Traceback" not in page.content()
        assert page.get_by_role("button", name="重试").is_visible()
    finally:
        context.close()
