"""``telechat`` command: one entry point, one sub-command per task.

Sub-commands that belong to a service or a job live with it and are imported only when used,
so ``telechat --help`` is instant and a missing extra is reported as "install it", not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, function, one-line help); the function takes argv and returns an exit code
    "chat": ("telechat.chat_cli", "chat_main", "interactive multi-turn streaming chat with a model"),
    "generate": ("telechat.chat_cli", "generate_main", "generate a reply to one prompt and print it"),
    "serve": ("services.api.main", "main", "start the HTTP API (OpenAI-compatible + legacy TeleChat routes)"),
    "web": ("services.web.launch", "main", "start the Streamlit chat UI"),
    "doctor": ("telechat.doctor", "main", "check the installation, GPUs and a model folder"),
    "demo-model": ("telechat.chat_cli", "demo_model_main", "write the small built-in demo checkpoint to a folder"),
    "finetune": ("jobs.finetune.cli", "main", "LoRA or full supervised fine-tuning"),
    "merge-lora": ("jobs.finetune.merge", "main", "merge a LoRA adapter into its base model"),
    "quantize": ("jobs.quant.cli", "main", "GPTQ int4/int8 quantization"),
    "eval-ppl": ("telechat.eval_ppl", "main", "perplexity per context length and RoPE scaling mode"),
}

EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "sse_starlette": "serve", "streamlit": "web", "peft": "train",
          "deepspeed": "train", "gptqmodel": "quant", "optimum": "quant", "torch": "core", "transformers": "core"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telechat", description="TeleChat Stack: run, serve, fine-tune and quantize "
                                "TeleChat models. `telechat COMMAND --help` explains each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``telechat COMMAND ...``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"telechat: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    module, func, _ = COMMANDS[argv[0]]
    try:
        entry = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"telechat: `{argv[0]}` needs the '{extra}' extra: pip install 'telechat-stack[{extra}]'",
              file=sys.stderr)
        return 2
    return run_guarded(entry, argv[1:])


def run_guarded(entry, argv: list[str]) -> int:
    """Run an entry point, turning expected failures into one line on stderr and exit code ≠ 0."""
    from services.settings_cli import SettingsError
    from telechat.errors import UserError

    try:
        return int(entry(argv) or 0)
    except (UserError, SettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
