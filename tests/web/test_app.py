"""The page itself, run by Streamlit's AppTest (no browser) against an API that is down.

Also: the web side never imports torch, and the launcher builds the right command.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from services.web import launch
from services.web.settings import WebSettings, get_settings

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "services/web/app.py"
SECRET = "k-never-shown-0042"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def down_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[AppTest]:
    """The page with API_URL pointing at a closed port and an API key configured."""
    import streamlit as st

    monkeypatch.setenv("API_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("API_KEY", SECRET)
    get_settings.cache_clear()
    st.cache_data.clear()
    st.cache_resource.clear()
    yield AppTest.from_file(str(APP), default_timeout=30).run()
    get_settings.cache_clear()


def _texts(at: AppTest) -> str:
    parts = [str(getattr(e, "value", "")) for e in (*at.markdown, *at.caption, *at.error)]
    return "\n".join(parts)


def test_page_renders_with_api_down(down_app: AppTest) -> None:
    at = down_app
    assert not at.exception
    assert "API 不可用" in _texts(at)
    assert at.chat_input  # the page stays usable


def test_api_down_gives_friendly_message_and_keeps_conversation(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("你好").run()
    at.chat_input[0].set_value("还在吗？").run()
    assert not at.exception
    assert [m.name for m in at.chat_message] == ["user", "user"]
    assert len(at.error) == 1 and "无法连接到 API" in at.error[0].value
    assert "Traceback" not in _texts(at)
    assert at.button(key="regenerate").label == "重试"


def test_edit_and_resend_replaces_last_user_message(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("你好").run()
    at.button(key="edit").click().run()
    at.text_area(key="edit_text").input("你好呀")  # inside a form: sent with the submit click
    next(b for b in at.button if b.label == "发送").click().run()
    assert not at.exception
    assert [m.markdown[0].value for m in at.chat_message] == ["你好呀"]


def test_clear_and_language_switch(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("hello").run()
    at.button(key="clear").click().run()
    assert not at.chat_message
    at.button_group(key="lang").set_value("en").run()
    assert "API unavailable" in _texts(at)
    assert at.chat_input[0].placeholder.startswith("Type a message")


def test_api_key_is_never_rendered(down_app: AppTest) -> None:
    at = down_app
    at.chat_input[0].set_value("你好").run()
    assert SECRET not in repr(at._tree)
    assert "已配置访问密钥" in _texts(at)


def test_web_side_never_imports_torch() -> None:
    """The web image has no torch: importing every web module and running the page must not need it."""
    code = (
        "import sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        "import services.web, services.web.client, services.web.conversation, services.web.i18n\n"
        "import services.web.launch, services.web.settings, services.web.sse\n"
        f"AppTest.from_file({str(APP)!r}, default_timeout=30).run()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'telechat')))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "API_URL": f"http://127.0.0.1:{_closed_port()}"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_URL", "http://api:9000")
    monkeypatch.setenv("API_KEY", SECRET)
    monkeypatch.setenv("WEB_PORT", "9501")
    monkeypatch.delenv("WEB_HOST", raising=False)
    s = WebSettings()
    assert (s.api_url, s.web_host, s.web_port, s.api_key_value) == ("http://api:9000", "0.0.0.0", 9501, SECRET)
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump())
    monkeypatch.setenv("API_KEY", "")
    assert WebSettings().api_key_value is None  # empty env means unset


def test_launch_command_and_help() -> None:
    cmd = launch.build_command("127.0.0.1", 8599)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert cmd[cmd.index("--server.port") + 1] == "8599"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--client.showErrorDetails") + 1] == "none"
    with pytest.raises(SystemExit) as info:
        launch.main(["--help"])
    assert info.value.code == 0
