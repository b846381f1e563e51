"""The page itself, run by Streamlit's AppTest (no browser) against an API that is down, with its chats in a
SQLite file of its own. Also: the web side never imports torch, the launcher and its sub-commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from services.web import launch
from services.web.settings import WebSettings, get_settings
from services.web.store import close_shared, open_from_settings, users

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "services/web/app.py"
SECRET = "k-never-shown-0042"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The page's environment: API_URL at a closed port, an API key, chats under tmp_path."""
    import streamlit as st

    for name in ("DATABASE_URL", "WEB_AUTH", "WEB_SESSION_TTL_H"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("API_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("API_KEY", SECRET)
    monkeypatch.setenv("WEB_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    close_shared()
    st.cache_data.clear()
    st.cache_resource.clear()
    yield tmp_path / "data"
    close_shared()
    get_settings.cache_clear()


@pytest.fixture
def down_app(page_env: Path) -> AppTest:
    """The page with the API down and no login."""
    return AppTest.from_file(str(APP), default_timeout=30).run()


def _texts(at: AppTest) -> str:
    parts = [str(getattr(e, "value", "")) for e in (*at.markdown, *at.caption, *at.error, *at.warning)]
    return "\n".join(parts)


def _until(at: AppTest, done, timeout: float = 20.0) -> AppTest:
    """Rerun the page until ``done(at)``: replies are written by a background thread."""
    deadline = time.monotonic() + timeout
    while not done(at):
        assert time.monotonic() < deadline, f"page never settled: {_texts(at)}"
        time.sleep(0.1)
        at.run()
    return at


def test_page_renders_with_api_down(down_app: AppTest) -> None:
    at = down_app
    assert not at.exception
    assert "API 不可用" in _texts(at)
    assert at.chat_input  # the page stays usable
    assert at.button(key="new_chat")


def test_api_down_gives_friendly_message_and_keeps_conversation(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("你好").run()
    _until(at, lambda a: len(a.error) == 1)
    chat_id = at.query_params["c"]
    at.chat_input[0].set_value("还在吗？").run()
    _until(at, lambda a: len(a.error) == 1 and len(a.chat_message) == 2)
    assert not at.exception
    assert [m.name for m in at.chat_message] == ["user", "user"]
    assert "无法连接到 API" in at.error[0].value
    assert "Traceback" not in _texts(at)
    assert at.button(key="regenerate").label == "重试"
    assert at.query_params["c"] == chat_id, "both turns went to the same conversation"


def test_edit_and_resend_replaces_last_user_message(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("你好").run()
    _until(at, lambda a: len(a.error) == 1)
    at.button(key="edit").click().run()
    at.text_area(key="edit_text").input("你好呀")  # inside a form: sent with the submit click
    next(b for b in at.button if b.label == "发送").click().run()
    _until(at, lambda a: len(a.error) == 1)
    assert not at.exception
    assert [m.markdown[0].value for m in at.chat_message] == ["你好呀"]


def test_clear_new_chat_and_language_switch(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("hello").run()
    _until(at, lambda a: len(a.error) == 1)
    at.button(key="clear").click().run()
    assert not at.chat_message
    at.button(key="new_chat").click().run()
    assert "c" not in at.query_params
    at.button_group(key="lang").set_value("en").run()
    assert "API unavailable" in _texts(at)
    assert at.chat_input[0].placeholder.startswith("Type a message")


def test_a_chat_of_the_url_opens_and_a_foreign_one_does_not(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("remember me").run()
    _until(at, lambda a: len(a.error) == 1)
    chat_id = at.query_params["c"]
    fresh = AppTest.from_file(str(APP), default_timeout=30)
    fresh.query_params["c"] = chat_id
    fresh.run()
    assert [m.markdown[0].value for m in fresh.chat_message] == ["remember me"]
    forged = AppTest.from_file(str(APP), default_timeout=30)
    forged.query_params["c"] = "0" * 32
    forged.run()
    assert not forged.chat_message and "找不到该对话" in _texts(forged)


def test_api_key_is_never_rendered(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("你好").run()
    _until(at, lambda a: len(a.error) == 1)
    assert SECRET not in repr(at._tree)
    assert "已配置访问密钥" in _texts(at)


def test_password_auth_shows_a_login_form_and_checks_the_password(page_env: Path, monkeypatch) -> None:
    monkeypatch.setenv("WEB_AUTH", "password")
    get_settings.cache_clear()
    db = open_from_settings(get_settings())
    users.add_user(db, "alice", "alice-password")
    db.close()
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.chat_input, "nothing of the chat before a login"
    at.text_input(key="login_name").input("alice")
    at.text_input(key="login_password").input("wrong-password")
    next(b for b in at.button if b.label == "登录").click().run()
    assert "用户名或密码错误" in _texts(at) and not at.chat_input
    at.text_input(key="login_password").input("alice-password")
    next(b for b in at.button if b.label == "登录").click().run()
    assert not at.error
    scripts = [e.proto.body for e in at.get("html")]
    assert any("_telechat/session" in body for body in scripts), "the page hands the ticket to the cookie route"


def test_web_side_never_imports_torch() -> None:
    """The web image has no torch: importing every web module and running the page must not need it."""
    code = (
        "import sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        "import services.web, services.web.client, services.web.conversation, services.web.i18n\n"
        "import services.web.launch, services.web.settings, services.web.sse, services.web.admin\n"
        "import services.web.store.chats, services.web.store.users, services.web.replies\n"
        f"AppTest.from_file({str(APP)!r}, default_timeout=30).run()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'telechat')))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "API_URL": f"http://127.0.0.1:{_closed_port()}"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("API_URL", "http://api:9000")
    monkeypatch.setenv("API_KEY", SECRET)
    monkeypatch.setenv("WEB_PORT", "9501")
    monkeypatch.setenv("WEB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw-secret@db/chats")
    monkeypatch.setenv("WEB_AUTH", "password")
    monkeypatch.delenv("WEB_HOST", raising=False)
    s = WebSettings()
    assert (s.api_url, s.web_host, s.web_port, s.api_key_value) == ("http://api:9000", "0.0.0.0", 9501, SECRET)
    assert (s.web_data_dir, s.web_auth) == (tmp_path, "password")
    assert s.database_url_value == "postgresql://u:pw-secret@db/chats"
    assert s.session_ttl.total_seconds() == 168 * 3600
    for secret in (SECRET, "pw-secret"):
        assert secret not in repr(s) and secret not in str(s.model_dump())
    monkeypatch.setenv("API_KEY", "")
    assert WebSettings().api_key_value is None  # empty env means unset
    monkeypatch.setenv("WEB_AUTH", "ldap")
    with pytest.raises(ValueError):
        WebSettings()


def test_launch_command_and_help(capsys) -> None:
    cmd = launch.build_command("127.0.0.1", 8599)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4] == str(REPO / "services/web/server.py")
    assert cmd[cmd.index("--server.port") + 1] == "8599"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--client.showErrorDetails") + 1] == "none"
    with pytest.raises(SystemExit) as info:
        launch.main(["--help"])
    assert info.value.code == 0
    assert "add-user" in capsys.readouterr().out
