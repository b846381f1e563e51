"""Commands of the ``telechat`` CLI and the core's own ones.

Every component declares its commands as :class:`Command` objects in a light module and registers
them under the ``telechat.commands`` entry-point group (``pyproject.toml``). The dispatcher
(:mod:`telechat.cli`) finds them there, so the core never names the services or jobs built on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One ``telechat NAME`` sub-command: ``target`` is ``"module:function"``; the function takes argv and
    returns an exit code. ``rank`` orders ``telechat --help``."""

    target: str
    help: str
    rank: int = 100


CHAT = Command("telechat.tools.chat_cli:chat_main", "interactive multi-turn streaming chat with a model", 10)
GENERATE = Command("telechat.tools.chat_cli:generate_main", "generate a reply to one prompt and print it", 11)
DOCTOR = Command("telechat.tools.doctor:main", "check the installation, GPUs and a model folder", 40)
DEMO_MODEL = Command("telechat.tools.chat_cli:demo_model_main", "write the small built-in demo checkpoint to a folder",
                     41)
EVAL_PPL = Command("telechat.tools.eval_ppl:main", "perplexity per context length and RoPE scaling mode", 60)
