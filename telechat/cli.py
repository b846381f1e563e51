"""``telechat`` command: one entry point, one sub-command per task.

Sub-commands are found through the ``telechat.commands`` entry-point group (each component
registers its own, see :mod:`telechat.commands`), and their modules are imported only when used,
so ``telechat --help`` is instant and a missing extra is reported as "install it", not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from telechat.commands import Command

EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "sse_starlette": "serve", "streamlit": "web", "peft": "train",
          "deepspeed": "train", "gptqmodel": "quant", "optimum": "quant", "torch": "core", "transformers": "core"}
"""Third-party module → the extra that installs it."""


def commands() -> dict[str, Command]:
    """Every registered sub-command, in help order."""
    found = {ep.name: ep.load() for ep in entry_points(group="telechat.commands")}
    return dict(sorted(found.items(), key=lambda kv: (kv[1].rank, kv[0])))


def _parser(known: dict[str, Command]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telechat", description="TeleChat Stack: run, serve, fine-tune and quantize "
                                "TeleChat models. `telechat COMMAND --help` explains each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in known.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``telechat COMMAND ...``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = commands()
    if not known:
        print("telechat: no commands are registered; install the package (pip install -e .)", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in known:
        parser = _parser(known)
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"telechat: error: unknown command {argv[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    return run(known[argv[0]], argv[0], argv[1:])


def run(command: Command, name: str, argv: list[str]) -> int:
    """Import and run one command with logging set up; a missing extra is one line, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    module, func = command.target.split(":")
    try:
        entry = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"telechat: `{name}` needs the '{extra}' extra: pip install 'telechat-stack[{extra}]'", file=sys.stderr)
        return 2
    return run_guarded(entry, argv)


def run_guarded(entry, argv: list[str]) -> int:
    """Run an entry point, turning expected failures into one line on stderr and exit code ≠ 0."""
    from telechat.errors import UserError

    try:
        return int(entry(argv) or 0)
    except Exception as e:
        if not (isinstance(e, UserError) or getattr(e, "user_error", False)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
