"""Start the web page: `python -m services.web [--host H] [--port P] [--api-url URL]`.

`telechat web` calls `main`. Flags override the environment (WEB_HOST, WEB_PORT, API_URL).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from services.web.settings import get_settings

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
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="telechat web", description="TeleChat web chat page.")
    parser.add_argument("--host", default=settings.web_host, help="bind address (WEB_HOST)")
    parser.add_argument("--port", type=int, default=settings.web_port, help="port (WEB_PORT)")
    parser.add_argument("--api-url", default=settings.api_url, help="TeleChat API base URL (API_URL)")
    args = parser.parse_args(argv)

    # The page reads its settings from the environment of the Streamlit process.
    env = {**os.environ, "API_URL": args.api_url}
    print(f"TeleChat web: http://{args.host}:{args.port}  (API: {args.api_url})", flush=True)
    proc = subprocess.Popen(build_command(args.host, args.port), env=env)
    # `docker stop` / a supervisor signal only this process: pass it on so Streamlit never
    # outlives us holding the port.
    signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reaches Streamlit too (same process group); let it shut down cleanly.
        return proc.wait()
