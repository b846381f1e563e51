"""``telechat finetune`` / ``python -m jobs.finetune``: parse, set up logging, run the recipe."""

from __future__ import annotations

import logging
from typing import Sequence

from jobs.finetune.parser import parse_args
from jobs.quiet import setup_logging
from telechat.errors import UserError

log = logging.getLogger("jobs.finetune")

EXIT_USAGE = 2
"""Exit code for bad options, data or checkpoints (argparse uses 2 as well)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fine-tuning job; returns the process exit code (0 ok, 2 bad input)."""
    setup_logging()
    try:
        args = parse_args(argv)
        from jobs.finetune.workflow import run_sft  # heavy imports (transformers, peft) after parsing

        final = run_sft(args)
    except UserError as e:
        log.error("%s", e)
        return EXIT_USAGE
    log.info("done: %s", final)
    return 0
