"""Start the vLLM OpenAI server on a TeleChat checkpoint, as a drop-in for our API's ``/v1/*`` routes.

    python -m telechat.vllm_plugin.serve [--model PATH] [--tensor-parallel-size 2] [-- VLLM ARGS...]

What it adds to ``python -m vllm.entrypoints.openai.api_server`` (which it then runs, with this
interpreter, so the plugin is loaded through its entry point):

- settings (``VllmServeSettings``, ``--help`` lists them) from flags > environment (``MODEL_PATH``,
  ``API_HOST``, ``API_PORT``, ``API_KEY``, ``DTYPE``, ``MAX_MODEL_LEN``, ``KV_CACHE_DTYPE`` (vLLM's
  ``--kv-cache-dtype``: ``fp8`` is E4M3 there too), ``ROPE_MODE``, ``MODEL_NAME``,
  ``TENSOR_PARALLEL_SIZE``, ``PIPELINE_PARALLEL_SIZE``) > our API's defaults (0.0.0.0:8070);
- no model configured → the built-in demo model (built on first use), as our API does;
- the chat template: official checkpoints ship none, so one is rendered from
  :func:`telechat.chat_format.install_chat_template` for this model's tokenizer markers and
  passed as ``--chat-template`` (the ``<_user>…<_bot>…<_end>`` format, defined once);
- ``ROPE_MODE`` (``none``, ``ntk``, ``ntk+scaling``) goes to the config as ``--hf-overrides``.

Arguments after ``--`` go to vLLM unchanged (e.g. ``--distributed-executor-backend ray``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from pydantic import Field

from services import settings_cli
from telechat.settings import (
    ApiHost,
    ApiKey,
    ApiPort,
    Dtype,
    KvCacheDtype,
    MaxModelLen,
    ModelName,
    ModelPath,
    RopeModeSetting,
)

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
PROG = "python -m telechat.vllm_plugin.serve"


class VllmServeSettings(settings_cli.CliSettings):
    """The launcher's settings: the same names, flags and env variables as our API's where they overlap."""

    model_path: ModelPath = None
    model_name: ModelName = Field(None, json_schema_extra={"flags": ["--served-model-name"], "nargs": "+"})
    api_host: ApiHost = "0.0.0.0"
    api_port: ApiPort = 8070
    api_key: ApiKey = None
    dtype: Dtype = "auto"
    max_model_len: MaxModelLen = None
    kv_cache_dtype: KvCacheDtype = "auto"
    rope_mode: RopeModeSetting = None
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each pipeline stage is split over")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages (layers split over GPUs)")


VLLM_FLAGS = {"api_host": "--host", "api_port": "--port", "api_key": "--api-key", "dtype": "--dtype",
              "max_model_len": "--max-model-len", "kv_cache_dtype": "--kv-cache-dtype",
              "tensor_parallel_size": "--tensor-parallel-size",
              "pipeline_parallel_size": "--pipeline-parallel-size"}
"""Our settings that vLLM's server takes as they are, with its flag."""


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> tuple[VllmServeSettings, list[str]]:
    """Our settings (flag > environment > default), and the vLLM arguments given after ``--``."""
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    settings = settings_cli.parse(VllmServeSettings, ours, prog=PROG, environ=environ, description=(
        "vLLM OpenAI server for TeleChat v1 (flag > environment > default). Arguments after -- go to vLLM."))
    return settings, extra


def write_chat_template(model: Path, cache: Path) -> Path:
    """Render the TeleChat chat template for ``model``'s tokenizer into ``cache``; return the file."""
    from telechat.chat_format import install_chat_template
    from telechat.tokenizer import load_tokenizer

    gen_file = model / "generation_config.json"
    generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
    template = install_chat_template(load_tokenizer(model), generation)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"chat-template-{hashlib.sha256(template.encode()).hexdigest()[:16]}.jinja"
    path.write_text(template, encoding="utf-8")
    return path


def vllm_argv(settings: VllmServeSettings, served_name: str, model: Path, template: Path,
              extra: list[str]) -> list[str]:
    """The vLLM server command line for these settings."""
    argv = [sys.executable, "-m", VLLM_SERVER, "--model", str(model), "--chat-template", str(template),
            "--served-model-name", *served_name.split(",")]
    for key, flag in VLLM_FLAGS.items():
        if getattr(settings, key) is not None:
            argv += [flag, str(getattr(settings, key))]
    if settings.rope_mode:
        argv += ["--hf-overrides", json.dumps({"rope_mode": settings.rope_mode})]
    return argv + extra


def main(argv: list[str] | None = None) -> None:
    """Resolve the settings, prepare model and chat template, then become the vLLM server."""
    try:
        settings, extra = parse_args(sys.argv[1:] if argv is None else argv)
    except settings_cli.SettingsError as e:
        raise SystemExit(f"error: {e}") from None
    from telechat.model.checkpoint import CheckpointError, inspect_checkpoint
    from telechat.demo import default_demo_dir, ensure_demo_model

    try:
        model = Path(settings.model_path).expanduser().resolve() if settings.model_path else ensure_demo_model()
        info = inspect_checkpoint(model, need_tokenizer=True)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    template = write_chat_template(model, default_demo_dir().parent / "vllm")
    command = vllm_argv(settings, info.served_name(settings.model_name), model, template, extra)
    print("starting:", " ".join(a if a != settings.api_key else "***" for a in command), flush=True)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
