"""Browser-test fixtures: headless Debian Chromium via Playwright, and the web page as a process.

Without Chromium the browser tests skip, unless TELECHAT_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / ".test-output"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# What runs as root in a container: no sandbox, no GPU, nothing phoning home (PACKAGES.md §6).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@dataclass
class WebServer:
    """A `python -m services.web` process (launcher + Streamlit child)."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the launcher passes SIGTERM on to Streamlit
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def web_server(tmp_path_factory) -> Iterator[Callable[..., WebServer]]:
    """Factory: `web_server(api_url, env={...})` starts the page on a free port once it is healthy."""
    started: list[WebServer] = []

    def start(api_url: str, env: dict[str, str] | None = None, timeout: float = 60) -> WebServer:
        port = free_port()
        log_path = tmp_path_factory.mktemp("web-server") / "web.log"
        child_env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "WEB_HOST", "WEB_PORT")}
        child_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        cmd = [sys.executable, "-m", "services.web", "--host", "127.0.0.1", "--port", str(port),
               "--api-url", api_url]
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=out, stderr=subprocess.STDOUT)
        server = WebServer(proc, f"http://127.0.0.1:{port}", log_path)
        started.append(server)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"web page exited with {proc.returncode}:\n{server.log()[-3000:]}")
            try:
                if httpx.get(server.url + "/_stcore/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"web page not healthy after {timeout}s:\n{server.log()[-3000:]}")

    yield start
    for server in started:
        server.stop()

