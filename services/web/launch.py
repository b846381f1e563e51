"""Start the web page: `python -m services.web [--host H] [--port P] [--api-url URL] ...`.

`telechat web` calls `main`. Flags (one per `WebSettings` field) override the environment
(WEB_HOST, WEB_PORT, API_URL, ...); the page gets the result through its environment.
`telechat web add-user NAME` and `telechat web backup FILE` manage its data (admin.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from services import settings_cli
from services.web.errors import WebError
from services.web.settings import WebSettings

SERVER = Path(__file__).with_name("server.py")
SUBCOMMANDS = ("add-user", "backup")
EPILOG = ("Also: `telechat web add-user NAME` creates a login for WEB_AUTH=password; "
          "`telechat web backup FILE` copies the SQLite database (each has --help).")


def build_command(host: str, port: int) -> list[str]:
    """The `streamlit run` command line (headless: a server never opens a browser)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(SERVER),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        # Uncaught errors would otherwise print a traceback into the page.
        "--client.showErrorDetails", "none",
        "--client.toolbarMode", "minimal",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run Streamlit until it exits, or one sub-command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from services.web import admin  # the storage stack loads only for these

            return {"add-user": admin.add_user_main, "backup": admin.backup_main}[argv[0]](argv[1:])
        parser = settings_cli.build_parser(WebSettings, prog="telechat web", description="TeleChat web chat page.",
                                           epilog=EPILOG)
        settings = settings_cli.load(WebSettings, parser.parse_args(argv))
    except (settings_cli.SettingsError, WebError) as e:  # `python -m services.web` has no other handler
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except ModuleNotFoundError as e:
        print(f"error: {e.name} is not installed: pip install 'telechat-stack[web]'", file=sys.stderr)
        return 2
    # The page reads its settings from the environment of the Streamlit process.
    env = {**os.environ, **settings_cli.to_env(settings)}
    where = "PostgreSQL (DATABASE_URL)" if settings.database_url else str(settings.web_data_dir)
    print(f"TeleChat web: http://{settings.web_host}:{settings.web_port}  (API: {settings.api_url}; "
          f"chats: {where}; login: {settings.web_auth})", flush=True)
    proc = subprocess.Popen(build_command(settings.web_host, settings.web_port), env=env)
    # `docker stop` / a supervisor signal only this process: pass it on so Streamlit never
    # outlives us holding the port.
    signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reaches Streamlit too (same process group); let it shut down cleanly.
        return proc.wait()
