"""API settings: one pydantic-settings class; precedence CLI flag > environment > default (DESIGN.md §2)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (1 MiB), checked before any parsing; larger bodies get 413."""


class Settings(BaseSettings):
    """Everything ``telechat serve`` can be told; each field reads the env variable of its upper-case name."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", protected_namespaces=())

    model_path: str | None = Field(None, description="checkpoint folder; unset = the built-in demo model")
    model_name: str | None = Field(None, description="served model id; default: the folder name, "
                                   "or `telechat-demo` for a demo checkpoint")
    api_host: str = "0.0.0.0"
    api_port: int = Field(8070, ge=0, le=65535)
    api_key: str | None = Field(None, description="bearer token required on model routes; unset = open")
    metrics_require_key: bool = Field(False, description="with API_KEY set, /metrics needs it too "
                                      "(default: open, for Prometheus scrapers on a private network)")
    cors_origins: str = Field("*", description="comma-separated allowed origins, `*` for any, empty for none")
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="longest prompt + reply; default: the checkpoint's")
    max_num_seqs: int = Field(32, ge=1, description="most requests decoding together")
    max_queue: int = Field(128, ge=0, description="requests allowed to wait beyond the running ones; "
                           "past it the API answers 429")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    lora_path: str | None = None
    rope_mode: Literal["none", "ntk", "ntk+scaling"] | None = None
    training_seqlen: int | None = Field(None, ge=1)
    base_seqlen: int | None = Field(None, ge=1)
    shutdown_grace_s: int = Field(10, ge=0, le=3600, description="on SIGTERM/SIGINT, seconds running requests "
                                  "may take to finish; then each ends with an error event (streams) or a 503")
    content_markers: Literal["text", "control"] = Field(
        "text", description="marker strings (<_user>, <_bot>, <_end>, <_system>) typed inside message content: "
        "`text` = plain text (default), `control` = read as the markers, as the official service does")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` split on commas, blanks dropped."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once (tests: ``get_settings.cache_clear()`` or pass
    ``Settings(...)`` to ``create_app``)."""
    return Settings()
