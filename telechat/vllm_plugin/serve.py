"""Start the vLLM OpenAI server on a TeleChat checkpoint, as a drop-in for our API's ``/v1/*`` routes.

    python -m telechat.vllm_plugin.serve [--model PATH] [--tensor-parallel-size 2] [-- VLLM ARGS...]

What it adds to ``python -m vllm.entrypoints.openai.api_server`` (which it then runs, with this
interpreter, so the plugin is loaded through its entry point):

- settings from flags > environment (``MODEL_PATH``, ``API_HOST``, ``API_PORT``, ``API_KEY``,
  ``DTYPE``, ``MAX_MODEL_LEN``, ``ROPE_MODE``, ``MODEL_NAME``, ``TENSOR_PARALLEL_SIZE``,
  ``PIPELINE_PARALLEL_SIZE``) > our API's defaults (0.0.0.0:8070);
- no model configured → the built-in demo model (built on first use), as our API does;
- the chat template: official checkpoints ship none, so one is rendered from
  :func:`telechat.chat_format.install_chat_template` for this model's tokenizer markers and
  passed as ``--chat-template`` (the ``<_user>…<_bot>…<_end>`` format, defined once);
- ``ROPE_MODE`` (``none``, ``ntk``, ``ntk+scaling``) goes to the config as ``--hf-overrides``.

Arguments after ``--`` go to vLLM unchanged (e.g. ``--distributed-executor-backend ray``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from telechat.config import ROPE_MODES

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
ENV = {"model": "MODEL_PATH", "host": "API_HOST", "port": "API_PORT", "api_key": "API_KEY", "dtype": "DTYPE",
       "max_model_len": "MAX_MODEL_LEN", "rope_mode": "ROPE_MODE", "served_model_name": "MODEL_NAME",
       "tensor_parallel_size": "TENSOR_PARALLEL_SIZE", "pipeline_parallel_size": "PIPELINE_PARALLEL_SIZE"}
DEFAULTS = {"host": "0.0.0.0", "port": "8070", "dtype": "auto", "tensor_parallel_size": "1",
            "pipeline_parallel_size": "1"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the vLLM arguments given after ``--``."""
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m telechat.vllm_plugin.serve",
                                description="vLLM OpenAI server for TeleChat v1 (flag > environment > default).")
    p.add_argument("--model", help="checkpoint folder (env MODEL_PATH); none → the built-in demo model")
    p.add_argument("--host", help="bind address (env API_HOST, default 0.0.0.0)")
    p.add_argument("--port", help="port (env API_PORT, default 8070)")
    p.add_argument("--api-key", help="bearer token required on /v1 routes (env API_KEY)")
    p.add_argument("--dtype", help="auto, bfloat16, float16 or float32 (env DTYPE)")
    p.add_argument("--max-model-len", help="longest prompt + reply (env MAX_MODEL_LEN; default: the checkpoint's)")
    p.add_argument("--rope-mode", help=f"RoPE policy past training_seqlen: {', '.join(ROPE_MODES)} (env ROPE_MODE)")
    p.add_argument("--served-model-name", help="model id in /v1/models (env MODEL_NAME; default as our API: "
                   "telechat-demo for the demo model, else the folder name)")
    p.add_argument("--tensor-parallel-size", help="GPUs per pipeline stage (env TENSOR_PARALLEL_SIZE, default 1)")
    p.add_argument("--pipeline-parallel-size", help="pipeline stages (env PIPELINE_PARALLEL_SIZE, default 1)")
    return p.parse_args(ours), extra


def resolve(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """Each setting from its flag, else its environment variable, else the default; empty = unset."""
    out = {}
    for key, env in ENV.items():
        value = getattr(args, key) or environ.get(env, "").strip() or DEFAULTS.get(key)
        if value:
            out[key] = str(value)
    if out.get("rope_mode") and out["rope_mode"] not in ROPE_MODES:
        raise SystemExit(f"error: ROPE_MODE {out['rope_mode']!r} is not one of {', '.join(ROPE_MODES)}")
    return out


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


def vllm_argv(settings: dict[str, str], model: Path, template: Path, extra: list[str]) -> list[str]:
    """The vLLM server command line for these settings."""
    argv = [sys.executable, "-m", VLLM_SERVER, "--model", str(model), "--chat-template", str(template),
            "--served-model-name", settings["served_model_name"]]
    for key in ("host", "port", "api_key", "dtype", "max_model_len", "tensor_parallel_size",
                "pipeline_parallel_size"):
        if key in settings:
            argv += [f"--{key.replace('_', '-')}", settings[key]]
    if "rope_mode" in settings:
        argv += ["--hf-overrides", json.dumps({"rope_mode": settings["rope_mode"]})]
    return argv + extra


def main(argv: list[str] | None = None) -> None:
    """Resolve the settings, prepare model and chat template, then become the vLLM server."""
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    settings = resolve(args, dict(os.environ))
    from telechat.checkpoint import CheckpointError, inspect_checkpoint
    from telechat.demo import default_demo_dir, ensure_demo_model

    try:
        model = Path(settings["model"]).expanduser().resolve() if "model" in settings else ensure_demo_model()
        info = inspect_checkpoint(model, need_tokenizer=True)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    template = write_chat_template(model, default_demo_dir().parent / "vllm")
    settings["served_model_name"] = info.served_name(settings.get("served_model_name"))
    command = vllm_argv(settings, model, template, extra)
    print("starting:", " ".join(a if a != settings.get("api_key") else "***" for a in command), flush=True)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
