"""`telechat web add-user NAME` and `telechat web backup FILE`: the web UI's data, from a shell.

Both read the storage settings like the page (DATABASE_URL, else SQLite in WEB_DATA_DIR; or
``--database-url`` / ``--data-dir``). Mistakes are one line on stderr and exit code 2 (launch.py).
"""

from __future__ import annotations

import getpass
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from services import settings_cli
from services.web.errors import WebError
from services.web.settings import StorageSettings
from services.web.store import open_from_settings, users
from services.web.store.database import database_url


def add_user_main(argv: list[str]) -> int:
    """Create a user who can log in with WEB_AUTH=password. The password is asked twice on a terminal, or
    read as the first line of stdin (`echo "$PASSWORD" | telechat web add-user alice`)."""
    parser = settings_cli.build_parser(
        StorageSettings, prog="telechat web add-user",
        description="Create a user who can log in with WEB_AUTH=password. The password is asked twice on a "
                    "terminal, or read as the first line of stdin.",
        epilog="The user `local` (who owns the chats made with WEB_AUTH=none) can be given a password this way "
               "too: its chats then belong to that login.")
    parser.add_argument("name", help="user name: 1-64 letters, digits or . _ @ -")
    args = parser.parse_args(argv)
    settings = settings_cli.load(StorageSettings, args)
    password = _read_password()
    db = open_from_settings(settings)
    try:
        user = users.add_user(db, args.name, password)
    finally:
        db.close()
    print(f"user {user.name!r} can log in now (database {db.url})")
    return 0


def backup_main(argv: list[str]) -> int:
    """Copy the SQLite database to FILE while the page may be running (SQLite's online backup)."""
    parser = settings_cli.build_parser(StorageSettings, prog="telechat web backup", description=backup_main.__doc__,
                                       epilog="PostgreSQL (DATABASE_URL=postgresql://...): use pg_dump instead.")
    parser.add_argument("file", type=Path, help="the copy to write (must not exist yet)")
    args = parser.parse_args(argv)
    settings = settings_cli.load(StorageSettings, args)
    url = database_url(settings.database_url_value, settings.web_data_dir)
    if url.get_backend_name() != "sqlite" or not url.database:
        raise WebError("the database is not SQLite: back up PostgreSQL with pg_dump")
    source = Path(url.database)
    if not source.is_file():
        raise WebError(f"no database at {source} (nothing to back up yet)")
    try:
        args.file.touch(mode=0o600, exist_ok=False)  # private, like the database
    except FileExistsError:
        raise WebError(f"{args.file} exists already; choose a new file name") from None
    except OSError as e:
        raise WebError(f"cannot write {args.file}: {e.strerror}") from None
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(args.file)) as dest:
        src.backup(dest)
    print(f"copied {source} to {args.file}")
    return 0


def _read_password() -> str:
    """The new password: asked twice on a terminal, else the first line of stdin."""
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("password: ")
            if getpass.getpass("again: ") != password:
                raise WebError("the two passwords differ")
            return password
        return sys.stdin.readline().rstrip("\r\n")
    except (EOFError, KeyboardInterrupt):
        raise WebError("no password given") from None
