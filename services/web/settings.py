"""Web UI settings: one pydantic-settings model; flags (launch.py), env names and ``--help`` are derived
from its fields (``services/settings_cli.py``), names from docs/conventions.md (settings). No ``.env`` file is read."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr

from services.settings_cli import CliSettings


class WebSettings(CliSettings):
    """Where the page listens and which API it talks to: flag (launch.py) > env > default."""

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

    @property
    def api_key_value(self) -> str | None:
        """The raw token for the Authorization header (None when unset)."""
        return self.api_key.get_secret_value() if self.api_key else None


@lru_cache(maxsize=1)
def get_settings() -> WebSettings:
    """Settings read once per process (Streamlit reruns the script, not the process)."""
    return WebSettings()
