"""API settings: one pydantic-settings class; precedence CLI flag > environment > default (docs/conventions.md)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator, model_validator

from telechat.chat_format import ContentMarkers
from telechat.engine.guided import GRAMMAR_TIMEOUT_S
from telechat.settings import (
    ApiHost,
    ApiKey,
    ApiPort,
    KvCacheDtype,
    LoraModules,
    ModelName,
    ModelSettings,
    parse_lora_modules,
    split_names,
)

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (1 MiB), checked before any parsing; larger bodies get 413."""


class Settings(ModelSettings):
    """Everything ``telechat serve`` can be told: the model settings plus the server's. Flags, env names
    (upper-case field name) and ``--help`` are derived from the fields (``services/settings_cli.py``)."""

    model_name: ModelName = Field(None, json_schema_extra={"flags": ["--model-name", "--served-model-name"],
                                                           "nargs": "+"})
    api_host: ApiHost = "0.0.0.0"
    api_port: ApiPort = 8070
    api_key: ApiKey = None
    metrics_require_key: bool = Field(False, description="with API_KEY set, /metrics needs it too "
                                      "(default: open, for Prometheus scrapers on a private network)")
    cors_origins: str = Field("*", description="comma-separated allowed origins, `*` for any, empty for none")
    max_num_seqs: int = Field(32, ge=1, description="most requests decoding together")
    max_num_batched_tokens: int = Field(8192, ge=1, description="token budget of one engine step: decodes "
                                        "plus prefill chunks (longer prompts are split across steps); at "
                                        "least max_num_seqs")
    prefix_caching: bool = Field(True, description="reuse the KV cache of prompt prefixes seen before "
                                 "(multi-turn chats, shared system prompts)")
    kv_cache_dtype: KvCacheDtype = "auto"
    lora_modules: LoraModules = None
    enable_lora: bool = Field(False, description="serve LoRA adapters chosen per request (on with --lora-modules); "
                              "POST /v1/load_lora_adapter adds adapters at run time")
    max_loras: int = Field(4, ge=1, description="LoRA adapters on the GPU at once (slots); more may be loaded, "
                           "a request for one waits until a slot is free")
    max_lora_rank: int | None = Field(None, ge=1, description="largest LoRA rank the slots hold; unset = 64, or "
                                      "the largest rank among --lora-modules when higher")
    max_queue: int = Field(128, ge=0, description="requests allowed to wait beyond the running ones; "
                           "past it the API answers 429")
    api_server_count: int | None = Field(None, ge=1, le=64, description="API processes sharing the port over "
                                         "one engine core (each parses, tokenizes and streams its share of the "
                                         "requests); unset: with the engine on CUDA one per 4 CPU cores, at most "
                                         "4 (TTFT at 64 concurrent streams on an H200, p99: 285 ms with 4, 323 "
                                         "with 1), else 1")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1, description="share of GPU memory the engine may use")
    shutdown_grace_s: int = Field(10, ge=0, le=3600, description="on SIGTERM/SIGINT, seconds running requests "
                                  "may take to finish; then each ends with an error event (streams) or a 503",
                                  json_schema_extra={"flags": ["--shutdown-grace"]})
    grammar_timeout_s: float = Field(GRAMMAR_TIMEOUT_S, gt=0, le=3600, description="seconds a structured-output "
                                     "grammar (response_format, guided_*, tools) may take to build, in the API's check "
                                     "and in the engine; a slower one is refused with a 400",
                                     json_schema_extra={"flags": ["--grammar-timeout"]})
    content_markers: ContentMarkers = Field(
        "text", description="marker strings (<_user>, <_bot>, <_end>, <_system>) typed inside message content: "
        "`text` = plain text (default), `control` = read as the markers, as the official service does")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("lora_modules")
    @classmethod
    def _lora_modules(cls, v: str | None) -> str | None:
        parse_lora_modules(v)
        return v

    @property
    def lora_module_map(self) -> dict[str, str]:
        """``lora_modules`` as name -> folder."""
        return parse_lora_modules(self.lora_modules)

    @property
    def lora_enabled(self) -> bool:
        """Per-request LoRA adapters are served (``enable_lora`` or adapters given at start)."""
        return self.enable_lora or bool(self.lora_module_map)

    @model_validator(mode="after")
    def _step_budget(self) -> Settings:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}): every running request decodes one token per step")
        return self

    @property
    def served_names(self) -> list[str]:
        """``model_name`` split: the main id first, then the aliases (empty: the default name)."""
        return split_names(self.model_name)

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` split on commas, blanks dropped."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once (tests: ``get_settings.cache_clear()`` or pass
    ``Settings(...)`` to ``create_app``)."""
    return Settings()
