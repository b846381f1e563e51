"""Browser-test fixtures: headless Debian Chromium via Playwright, and the web page as a process.

Without Chromium the browser tests skip, unless TELECHAT_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServiceProcess, free_port, start_service

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / ".test-output"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# What runs as root in a container: no sandbox, no GPU, nothing phoning home (docs/conventions.md, browser tests).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium shared by the browser tests."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason is None and not Path(CHROMIUM).is_file():
        reason = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium; or set CHROMIUM_PATH)"
    if reason is not None:
        if os.environ.get("TELECHAT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TELECHAT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def web_server(tmp_path_factory) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: `web_server(api_url, env={...})` starts the page on a free port once it is healthy."""
    started: list[ServiceProcess] = []

    def start(api_url: str, env: dict[str, str] | None = None, timeout: float = 60) -> ServiceProcess:
        port = free_port()
        child_env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "WEB_HOST", "WEB_PORT")}
        child_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        cmd = [sys.executable, "-m", "services.web", "--host", "127.0.0.1", "--port", str(port),
               "--api-url", api_url]
        log_path = tmp_path_factory.mktemp("web-server") / "web.log"
        # The web launcher passes SIGTERM on to Streamlit, so stopping the launcher stops the page.
        server = start_service(cmd, port, "/_stcore/health", log_path, child_env, timeout, "web page")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()

