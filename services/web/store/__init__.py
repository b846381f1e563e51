"""The web UI's storage: SQLAlchemy models, Alembic migrations and the functions the page calls.

``chats`` (conversations, messages, replies being written) and ``users`` (passwords, logins) take an
open :class:`Database`; :func:`shared_database` is the one of this process, opened from the settings.
"""

from __future__ import annotations

import threading

from services.web.settings import StorageSettings, get_settings
from services.web.store.database import Database, StorageError, database_url, open_database

__all__ = ["Database", "StorageError", "close_shared", "open_from_settings", "shared_database"]

_lock = threading.Lock()
_shared: Database | None = None


def open_from_settings(settings: StorageSettings, stale_reply_s: float = 70.0) -> Database:
    """Open and migrate the database the settings name (DATABASE_URL, else SQLite in WEB_DATA_DIR)."""
    url = database_url(settings.database_url_value, settings.web_data_dir)
    return open_database(url, stale_reply_s=stale_reply_s)


def shared_database() -> Database:
    """The database of this process, opened on first use; a failed open is tried again on the next call
    (a PostgreSQL server that is still starting)."""
    global _shared
    with _lock:
        if _shared is None:
            settings = get_settings()
            _shared = open_from_settings(settings, settings.stale_reply_s)
        return _shared


def close_shared() -> None:
    """Close this process's database; the next ``shared_database`` opens it again from the settings."""
    global _shared
    with _lock:
        if _shared is not None:
            _shared.close()
        _shared = None
