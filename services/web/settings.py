"""Web UI settings: one pydantic-settings model; flags (launch.py), env names and ``--help`` are derived
from its fields (``services/settings_cli.py``), names from docs/conventions.md (settings). No ``.env`` file is read."""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from services.settings_cli import CliSettings


def default_data_dir() -> Path:
    """Where chats live when WEB_DATA_DIR is unset: the XDG data folder, like other desktop tools."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "telechat-stack" / "web"


class StorageSettings(CliSettings):
    """Where conversations and users are kept; all that `telechat web add-user` and `backup` need."""

    web_data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Folder of the SQLite database (telechat-web.db) when DATABASE_URL is unset.",
        json_schema_extra={"flags": ["--data-dir"]})
    # SecretStr: a PostgreSQL URL carries its password; it is never printed or logged.
    database_url: SecretStr | None = Field(
        None, description="SQLAlchemy URL of the database, e.g. postgresql://user:password@host/db. "
                          "Unset: SQLite in WEB_DATA_DIR.")

    @property
    def database_url_value(self) -> str | None:
        """The raw URL (None when unset)."""
        return self.database_url.get_secret_value() if self.database_url else None


class WebSettings(StorageSettings):
    """Where the page listens, which API it talks to, where chats are stored and who may log in:
    flag (launch.py) > env > default."""

    api_url: str = Field("http://localhost:8070", description="Base URL of the TeleChat API.")
    # SecretStr so a stray repr()/log line never prints the token; the page never shows it.
    api_key: SecretStr | None = Field(None, description="Bearer token the API expects, if any.")
    web_host: str = Field("0.0.0.0", description="Address the Streamlit server binds.",
                          json_schema_extra={"flags": ["--host"]})
    web_port: int = Field(8501, ge=1, le=65535, description="Port the Streamlit server binds.",
                          json_schema_extra={"flags": ["--port"]})
    connect_timeout_s: float = Field(3.0, gt=0, description="TCP connect timeout for API calls.")
    # A reply streams token by token; this bounds the silence between two chunks, not the reply.
    read_timeout_s: float = Field(60.0, gt=0, description="Longest wait for the next bytes.")
    web_auth: Literal["none", "password"] = Field(
        "none", description="none: one local user, no login; password: users log in "
                            "(create them with `telechat web add-user NAME`).",
        json_schema_extra={"flags": ["--auth"]})
    web_session_ttl_h: float = Field(168.0, gt=0, description="Hours a login lasts (WEB_AUTH=password).",
                                     json_schema_extra={"flags": ["--session-ttl-h"]})

    @property
    def api_key_value(self) -> str | None:
        """The raw token for the Authorization header (None when unset)."""
        return self.api_key.get_secret_value() if self.api_key else None

    @property
    def session_ttl(self) -> timedelta:
        """How long a login lasts."""
        return timedelta(hours=self.web_session_ttl_h)

    @property
    def stale_reply_s(self) -> float:
        """A reply with no new chunk for this long has lost its writer (process killed): a live writer
        hears from the API at least every read timeout, or gives up and settles the reply itself."""
        return self.connect_timeout_s + self.read_timeout_s + 10.0


@lru_cache(maxsize=1)
def get_settings() -> WebSettings:
    """Settings read once per process (Streamlit reruns the script, not the process)."""
    return WebSettings()
