"""Web UI fixtures: headless Debian Chromium via Playwright, the web page as a process, the real API over the
demo model, and the two databases the storage tests run on (a SQLite file; a throwaway PostgreSQL cluster
from Debian's package).

Without Chromium the browser tests skip, unless TELECHAT_REQUIRE_BROWSER=1 (CI), where they fail.
Without PostgreSQL the PostgreSQL storage tests skip, unless TELECHAT_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import itertools
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServiceProcess, free_port, start_service
from tests.web.postgres import PostgresCluster, find_bin_dir

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / ".test-output"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# What runs as root in a container: no sandbox, no GPU, nothing phoning home (docs/conventions.md, browser tests).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
API_KEY = "web-test-" + secrets.token_hex(8)
WEB_ENV = ("API_URL", "API_KEY", "WEB_HOST", "WEB_PORT", "WEB_DATA_DIR", "DATABASE_URL", "WEB_AUTH",
           "WEB_SESSION_TTL_H", "CONNECT_TIMEOUT_S", "READ_TIMEOUT_S")
"""Settings variables of services/web; cleared for test pages so the developer's shell cannot leak in."""


def _require(variable: str, reason: str) -> None:
    """Skip for ``reason``, or fail when ``variable`` is 1 (CI must run the test)."""
    if os.environ.get(variable) == "1":
        pytest.fail(f"{variable}=1 but {reason}")
    pytest.skip(reason)


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
        _require("TELECHAT_REQUIRE_BROWSER", reason)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def web_api(demo_model_dir, api_server) -> ServiceProcess:
    """The real API over the demo model, with a bearer token the page must pass on."""
    return api_server(demo_model_dir, env={"API_KEY": API_KEY})


@pytest.fixture(scope="session")
def web_server(tmp_path_factory) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: ``web_server(api_url, env={...})`` starts the page on a free port once it is healthy. Its chats
    go to a fresh WEB_DATA_DIR unless ``env`` names one (a restart test passes the same folder twice)."""
    started: list[ServiceProcess] = []

    def start(api_url: str, env: dict[str, str] | None = None, timeout: float = 90) -> ServiceProcess:
        port = free_port()
        child_env = {k: v for k, v in os.environ.items() if k not in WEB_ENV}
        child_env.update({"PYTHONUNBUFFERED": "1", "WEB_DATA_DIR": str(tmp_path_factory.mktemp("web-data")),
                          **(env or {})})
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


# ---------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the whole session (each test gets a database of its own in it)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _require("TELECHAT_REQUIRE_POSTGRES", "PostgreSQL is not installed (apt-get install -y postgresql)")
    cluster = PostgresCluster(bin_dir).start()
    yield cluster
    cluster.stop()


_database_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A URL to an empty database: a SQLite file, or a new database in the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'telechat-web.db'}"
    from sqlalchemy import create_engine, text

    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = f"web_test_{next(_database_names)}"
    admin = create_engine(cluster.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return cluster.url.replace("/postgres?", f"/{name}?")
