"""``telechat finetune`` / ``python -m jobs.finetune``: parse, set up logging, run the recipe."""

from __future__ import annotations

import logging
import os
from typing import Sequence

from jobs.finetune.data import DataError
from jobs.finetune.parser import ArgsError, parse_args
from telechat.checkpoint import CheckpointError

log = logging.getLogger("jobs.finetune")

EXIT_USAGE = 2
"""Exit code for bad options, data or checkpoints (argparse uses 2 as well)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fine-tuning job; returns the process exit code (0 ok, 2 bad input)."""
    rank = int(os.environ.get("RANK", "0"))
    # Replicas only report warnings; rank 0 tells the story.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        from jobs.finetune.workflow import run_sft  # heavy imports (transformers, peft) after parsing

        final = run_sft(args)
    except (ArgsError, DataError, CheckpointError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    log.info("done: %s", final)
    return 0
