"""Start the web page: `python -m services.web [--host H] [--port P] [--api-url URL] ...`.

`telechat web` calls `main`. Flags (one per `WebSettings` field) override the environment
(WEB_HOST, WEB_PORT, API_URL, ...); the page gets the result through its environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from services import settings_cli
from services.web.settings import WebSettings

APP = Path(__file__).with_name("app.py")


def build_command(host: str, port: int) -> list[str]:
    """The `streamlit run` command line (headless: a server never opens a browser)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        # Uncaught errors would otherwise print a traceback into the page.
        "--client.showErrorDetails", "none",
        "--client.toolbarMode", "minimal",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run Streamlit until it exits; returns its exit status."""
    try:
        settings = settings_cli.parse(WebSettings, list(sys.argv[1:] if argv is None else argv),
                                      prog="telechat web", description="TeleChat web chat page.")
    except settings_cli.SettingsError as e:  # `python -m services.web` has no other handler
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    # The page reads its settings from the environment of the Streamlit process.
    env = {**os.environ, **settings_cli.to_env(settings)}
    print(f"TeleChat web: http://{settings.web_host}:{settings.web_port}  (API: {settings.api_url})", flush=True)
    proc = subprocess.Popen(build_command(settings.web_host, settings.web_port), env=env)
    # `docker stop` / a supervisor signal only this process: pass it on so Streamlit never
    # outlives us holding the port.
    signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reaches Streamlit too (same process group); let it shut down cleanly.
        return proc.wait()
