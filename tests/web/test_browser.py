"""The chat page in headless Chromium against the real API serving the demo model, on loopback.

Each test opens a fresh browser context (a fresh Streamlit session); the chats are in the page's database,
so they outlive the session: a reload, a second tab, a restart of the web process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.web.store import chats, users
from services.web.store.database import database_url, open_database
from tests.conftest import REPO, free_port
from tests.web.conftest import API_KEY, OUTPUT

pytestmark = pytest.mark.browser

LONG_PROMPT = "Keep writing forever"  # the demo model is trained to keep writing on it until max tokens
TIMEOUT_MS = 30_000
LATEX_CHAT = {"title": "公式", "messages": [
    {"role": "user", "content": "质能方程是什么？"},
    {"role": "assistant", "content": "质能方程：\\(E = mc^2\\)，展开为\n\\[E^2 = (pc)^2 + (mc^2)^2\\]"}]}


@pytest.fixture(scope="module")
def web_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-chats")


@pytest.fixture(scope="module")
def web(browser, web_api, web_server, web_data):
    return web_server(web_api.url, env={"API_KEY": API_KEY, "WEB_DATA_DIR": str(web_data)})


def _open(browser, url: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.split("/?")[0].rstrip("/"))
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


def _texts(page) -> list[str]:
    return [_reply_text(page, i) for i in range(_messages(page).count())]


def _wait_reply(page, count: int) -> str:
    """Wait for `count` chat messages, none still being written; return the last message's text."""
    page.wait_for_function(
        f"() => document.querySelectorAll('[data-testid=stChatMessage]').length === {count}"
        " && !document.querySelector('.st-key-live_reply')")
    _wait_idle(page)
    return _reply_text(page, count - 1)


def _wait_live(page, longer_than: int) -> str:
    """Wait until the reply being written shows more than `longer_than` characters; return them."""
    page.wait_for_function(
        "(n) => { const m = document.querySelector('.st-key-live_reply [data-testid=stMarkdownContainer]');"
        " return m && m.innerText.length > n; }", arg=longer_than)
    return page.locator(".st-key-live_reply [data-testid=stMarkdownContainer]").first.inner_text().rstrip("▌")


def _set_max_tokens(page, value: int) -> None:
    field = page.get_by_label("最大生成长度（token）")
    if not field.is_visible():
        page.get_by_text("生成参数").click()  # the sidebar expander starts collapsed
    field.fill(str(value))
    field.press("Enter")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('input')].some(i => i.value === '{value}')")
    _wait_idle(page)


def _chat_titles(page) -> list[str]:
    return page.locator(".st-key-chat_list [data-testid=stButton] button").all_inner_texts()


def _open_url(page, url: str) -> None:
    page.goto(url)
    page.get_by_test_id("stChatInputTextArea").wait_for()
    _wait_idle(page)


def _running(api) -> float:
    text = httpx.get(api.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).text
    match = re.search(r"^telechat:num_requests_running(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert match, "telechat:num_requests_running missing from /metrics"
    return float(match.group(1))


def _wait_not_running(api) -> None:
    deadline = time.monotonic() + 10
    while _running(api) != 0:
        assert time.monotonic() < deadline, "the API kept generating after Stop"
        time.sleep(0.1)


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


def _stored_reply(data_dir: Path, chat_url: str):
    """The last turn of the URL's chat, as the database holds it (the local user's)."""
    db = open_database(database_url(None, data_dir))
    try:
        chat_id = chat_url.split("c=")[1].split("&")[0]
        return chats.get_chat(db, users.local_user(db).id, chat_id).messages[-1]
    finally:
        db.close()


def _download(page, label: str, folder: Path) -> Path:
    """Click a download button; the file, saved under the name the page gives it."""
    with page.expect_download() as info:
        page.get_by_test_id("stDownloadButton").filter(has_text=label).get_by_role("button").click()
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    return path


def _import(page, path: Path) -> None:
    """Import a JSON export; the page opens the new chat."""
    before = page.url
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(path))
    page.wait_for_function("(before) => location.href !== before && location.search.includes('c=')", arg=before)
    _wait_idle(page)


# ---------------------------------------------------------------------------- tests


def test_chinese_message_streams_reply_and_the_chat_persists(page, web, web_api) -> None:
    """A Chinese question gets the API's reply, assembled intact from the stream; the URL names the chat, so a
    reload and a second tab show it; replies and code blocks copy; the screenshot of the page with its
    conversation list is the CI artifact."""
    assert _visible(page, "演示模型")
    assert _visible(page, "API 已就绪")
    _send(page, "你好")
    reply = _wait_reply(page, 2)
    assert _reply_text(page, 0) == "你好"
    assert _normalize(reply) == _normalize(_api_reply(web_api, "你好"))
    chat_url = page.url
    assert re.search(r"[?&]c=[0-9a-f]{32}", chat_url)
    page.get_by_role("button", name="复制").first.click()
    assert _normalize(page.evaluate("navigator.clipboard.readText()")) == _normalize(reply)

    page.reload()
    page.get_by_test_id("stChatInputTextArea").wait_for()
    _wait_reply(page, 2)
    assert _texts(page) == ["你好", reply]
    second = page.context.new_page()
    _open_url(second, chat_url)
    assert _texts(second) == ["你好", reply]
    second.close()

    page.get_by_role("button", name="新对话").click()
    page.wait_for_function("() => !document.querySelector('[data-testid=stChatMessage]')")
    _wait_idle(page)
    _send(page, "用 Python 打印你好")  # as a first turn the demo model answers with a code block
    _wait_reply(page, 2)
    code = _messages(page).nth(1).get_by_test_id("stCode")
    assert 'print("你好")' in code.inner_text()
    code.hover()
    code.get_by_role("button", name="Copy to clipboard").click()
    assert 'print("你好")' in page.evaluate("navigator.clipboard.readText()")
    assert _chat_titles(page)[:2] == ["用 Python 打印你好", "你好"]
    assert API_KEY not in page.content()
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-chat.png"), full_page=True)


STOP_TRIES = 3


def _stop_live_reply(page, web_data) -> bool:
    """Press Stop on the reply being written and wait until it is settled. True: it was stopped, and the page
    says so; False: it reached its end first (the demo model writes its 2000 tokens in ~6 s, and on a loaded
    machine the page run of the click can come later) — the stored reply says which."""
    page.get_by_role("button", name="停止生成").click()
    page.wait_for_function("() => !document.querySelector('.st-key-live_reply')")
    _wait_idle(page)
    if _stored_reply(web_data, page.url).finish_reason != "stopped":
        return False
    page.get_by_text("已停止生成").wait_for()
    return True


def _new_long_reply(page) -> str:
    """A new chat writing a long reply; its text once it is 20 characters long."""
    page.get_by_role("button", name="新对话").click()  # a fresh context: 2000 more tokens must fit
    page.wait_for_function("() => !document.querySelector('[data-testid=stChatMessage]')")
    _send(page, LONG_PROMPT)
    return _wait_live(page, 20)


def test_stop_keeps_the_partial_reply_also_after_a_reload(page, web, web_api, web_data) -> None:
    """Stop mid-reply: the text stops growing, the API stops generating, and the partial reply is stored,
    marked stopped. A reload mid-reply shows the reply still growing, and Stop works there too. (A reply that
    reaches its end before the click's page run is not a stop: the scene is played again, at most 3 times.)"""
    _set_max_tokens(page, 2000)
    for _ in range(STOP_TRIES):
        _new_long_reply(page)
        assert _running(web_api) == 1, "the reply finished before Stop could be pressed"
        if _stop_live_reply(page, web_data):
            break
    else:
        pytest.fail(f"Stop never landed before the reply's end in {STOP_TRIES} tries")
    partial = _reply_text(page, 1)
    time.sleep(1.0)
    assert _reply_text(page, 1) == partial, "the reply kept growing after Stop"
    _wait_not_running(web_api)
    stored = _stored_reply(web_data, page.url)
    assert (stored.status, stored.finish_reason) == ("cut", "stopped")
    assert _normalize(stored.content) == _normalize(partial) and len(partial) > 20

    for _ in range(STOP_TRIES):
        before = len(_new_long_reply(page))
        page.reload()
        page.get_by_test_id("stChatInputTextArea").wait_for()
        assert len(_wait_live(page, before + 20)) > before, "the reply goes on after the reload"
        if _stop_live_reply(page, web_data):
            break
    else:
        pytest.fail(f"Stop after a reload never landed before the reply's end in {STOP_TRIES} tries")
    _wait_not_running(web_api)
    stored = _stored_reply(web_data, page.url)
    assert (stored.status, stored.finish_reason) == ("cut", "stopped")
    assert _normalize(stored.content) == _normalize(_reply_text(page, 1))
    assert len(_messages(page).all()) == 2


def test_regenerate_replaces_the_answer(page) -> None:
    """Regenerate swaps the last answer for a new one instead of adding a turn."""
    _set_max_tokens(page, 4)
    _send(page, "你好")
    first = _wait_reply(page, 2)
    _set_max_tokens(page, 64)
    page.get_by_role("button", name="重新生成").click()
    page.wait_for_function(  # (the reply's text is briefly absent while the page redraws it)
        "(old) => { const m = document.querySelectorAll('[data-testid=stChatMessage]');"
        " const text = m.length === 2 && m[1].querySelector('[data-testid=stMarkdownContainer]');"
        " return !!text && !document.querySelector('.st-key-live_reply') && text.innerText !== old; }",
        arg=first)
    _wait_idle(page)
    second = _reply_text(page, 1)
    assert len(_messages(page).all()) == 2
    assert len(second) > len(first)


def test_conversation_list_search_rename_export_import_delete(page, tmp_path) -> None:
    """Two chats in the list; search finds one by its text; rename; the JSON export imports back as the same
    chat; LaTeX renders; delete asks first."""
    _send(page, "你好")
    _wait_reply(page, 2)
    page.get_by_role("button", name="新对话").click()
    page.wait_for_function("() => !document.querySelector('[data-testid=stChatMessage]')")
    _send(page, "介绍一下你自己")
    _wait_reply(page, 2)
    _send(page, "你好")
    _wait_reply(page, 4)
    titles = _chat_titles(page)
    assert titles[:2] == ["介绍一下你自己", "你好"]

    search = page.get_by_placeholder("搜索对话")
    search.fill("介绍")
    search.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.st-key-chat_list [data-testid=stButton]').length === 1")
    search.fill("")
    search.press("Enter")
    page.wait_for_function("(n) => document.querySelectorAll('.st-key-chat_list [data-testid=stButton]').length === n",
                           arg=len(titles))
    _wait_idle(page)

    page.locator(".st-key-chat_menu button").first.click()
    page.get_by_label("标题").fill("我的对话")
    page.get_by_role("button", name="重命名").click()
    page.wait_for_function("() => [...document.querySelectorAll('.st-key-chat_list button')]"
                           ".some(b => b.innerText === '我的对话')")
    page.keyboard.press("Escape")
    _wait_idle(page)

    shown = _texts(page)
    exported = _download(page, "JSON", tmp_path / "first")
    doc = json.loads(exported.read_text(encoding="utf-8"))
    assert doc["title"] == "我的对话" and [m["role"] for m in doc["messages"]] == ["user", "assistant"] * 2
    for got, seen in zip(doc["messages"], shown):
        assert _normalize(got["content"]) == _normalize(seen)
    markdown = _download(page, "Markdown", tmp_path / "first").read_text(encoding="utf-8")
    assert markdown.startswith("# 我的对话") and markdown.count("## 用户") == 2
    original = page.url
    _import(page, exported)
    assert page.url != original and _texts(page) == shown
    again = json.loads(_download(page, "JSON", tmp_path / "again").read_text(encoding="utf-8"))
    assert {**again, "exported_at": ""} == {**doc, "exported_at": ""}, "the import is the same chat"
    assert _chat_titles(page).count("我的对话") == 2

    latex = tmp_path / "latex.json"
    latex.write_text(json.dumps(LATEX_CHAT, ensure_ascii=False), encoding="utf-8")
    _import(page, latex)
    page.locator("[data-testid=stChatMessage] .katex").nth(1).wait_for()  # inline and display formula

    page.locator(".st-key-chat_menu button").first.click()
    page.get_by_role("button", name="删除对话").click()
    page.get_by_role("button", name="确认删除").click()
    page.wait_for_function("() => !document.querySelector('[data-testid=stChatMessage]')")
    _wait_idle(page)
    assert "公式" not in _chat_titles(page) and "c=" not in page.url


def test_restarting_the_web_process_keeps_the_chats(browser, web_api, web_server, tmp_path) -> None:
    """Chats outlive the web process; a reply being written when it stops is kept, marked interrupted."""
    data = tmp_path / "chats"
    first = web_server(web_api.url, env={"API_KEY": API_KEY, "WEB_DATA_DIR": str(data)})
    context, page = _open(browser, first.url)
    try:
        _send(page, "你好")
        reply = _wait_reply(page, 2)
        done_chat = page.url.split("/?", 1)[1]
        page.get_by_role("button", name="新对话").click()
        page.wait_for_function("() => !document.querySelector('[data-testid=stChatMessage]')")
        _set_max_tokens(page, 2000)
        _send(page, LONG_PROMPT)
        partial = _wait_live(page, 20)
        live_chat = page.url.split("/?", 1)[1]
        first.stop()  # SIGTERM mid-reply
        second = web_server(web_api.url, env={"API_KEY": API_KEY, "WEB_DATA_DIR": str(data)})
        _open_url(page, f"{second.url}/?{done_chat}")
        assert _texts(page) == ["你好", reply]
        assert _chat_titles(page) == [LONG_PROMPT, "你好"]
        _open_url(page, f"{second.url}/?{live_chat}")
        assert _visible(page, "生成被中断")
        assert _normalize(_reply_text(page, 1)).startswith(_normalize(partial))
        _wait_not_running(web_api)
    finally:
        context.close()


def _add_user(data_dir: Path, name: str, password: str) -> None:
    done = subprocess.run([sys.executable, "-m", "services.web", "add-user", name, "--data-dir", str(data_dir)],
                          cwd=REPO, input=password + "\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _login(browser, url: str, name: str, password: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_label("用户名").fill(name)
    page.get_by_label("密码").fill(password)
    page.get_by_role("button", name="登录").click()
    page.get_by_test_id("stChatInputTextArea").wait_for()
    _wait_idle(page)
    return context, page


def test_two_users_see_only_their_own_chats(browser, web_api, web_server, tmp_path) -> None:
    """WEB_AUTH=password: each user lists only their chats, a forged conversation id opens nothing, a login
    survives a reload (its cookie) and ends with Log out."""
    data = tmp_path / "chats"
    _add_user(data, "alice", "alice-password")
    _add_user(data, "bob", "bob-password")
    web = web_server(web_api.url, env={"API_KEY": API_KEY, "WEB_DATA_DIR": str(data), "WEB_AUTH": "password"})
    alice, alice_page = _login(browser, web.url, "alice", "alice-password")
    bob, bob_page = _login(browser, web.url, "bob", "bob-password")
    try:
        _send(alice_page, "这是爱丽丝的秘密")
        secret_reply = _wait_reply(alice_page, 2)
        alice_url = alice_page.url
        assert _visible(bob_page, "还没有对话。") and _chat_titles(bob_page) == []
        _open_url(bob_page, alice_url)
        assert _visible(bob_page, "找不到该对话")
        assert _messages(bob_page).count() == 0 and "秘密" not in bob_page.content()
        assert _chat_titles(bob_page) == []

        alice_page.reload()
        alice_page.get_by_test_id("stChatInputTextArea").wait_for()
        _wait_idle(alice_page)
        assert _texts(alice_page) == ["这是爱丽丝的秘密", secret_reply], "the login outlives a reload"
        assert _chat_titles(alice_page) == ["这是爱丽丝的秘密"]
        alice_page.get_by_role("button", name="退出登录").click()
        alice_page.get_by_label("用户名").wait_for()
        alice_page.goto(alice_url)
        alice_page.get_by_label("用户名").wait_for()
        assert "秘密" not in alice_page.content(), "after Log out the cookie opens nothing"
        alice_page.get_by_label("用户名").fill("alice")
        alice_page.get_by_label("密码").fill("wrong-password")
        alice_page.get_by_role("button", name="登录").click()
        alice_page.get_by_text("用户名或密码错误。").wait_for()
    finally:
        alice.close()
        bob.close()


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
        page.get_by_test_id("stAlertContentError").wait_for()
        _wait_idle(page)
        alert = page.get_by_test_id("stAlertContentError").inner_text()
        assert "无法连接到 API" in alert
        assert _texts(page) == ["你好", "有人吗？"]
        assert "Traceback" not in page.content()
        assert page.get_by_role("button", name="重试").is_visible()
    finally:
        context.close()
