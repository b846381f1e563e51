"""``run_config.yaml``: the resolved options of a run, kept in its output folder, and where a run stands.

``--resume`` reads the file, so a resumed run is the same run: an option not given again comes
from it, and a changed option that shapes the model or the data it sees is refused, by name.
The options in :data:`MAY_CHANGE` (how long to train, how often to save, log and evaluate,
activation memory, block compilation, the loss chunking, the merged export) may change;
``--backend`` is fixed like ``--zero`` (the checkpoints differ). The file is also a valid ``--config``:
``--config OUT/run_config.yaml --output NEW`` starts a new run with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from jobs.finetune.hparams import GROUPS, FinetuneArguments, TrainArguments

RUN_CONFIG = "run_config.yaml"
MAY_CHANGE = frozenset({"epochs", "max_steps", "save_steps", "save_total_limit", "eval_steps", "logging_steps",
                        "gradient_checkpointing", "compile", "loss_chunk_tokens", "merge"})
"""Options a resumed run may change; every other one is fixed for the run."""
NOT_SAVED = frozenset({"output", "resume", "overwrite"})
"""Where and how this invocation runs, not what the run is."""


def option_values(args: FinetuneArguments) -> dict[str, Any]:
    """Every saved option of ``args`` by its (underscored) name, in ``--help`` order."""
    return {f.name: getattr(getattr(args, group), f.name)
            for group, cls in GROUPS.items() for f in dataclasses.fields(cls) if f.name not in NOT_SAVED}


def save_run_config(args: FinetuneArguments, output: Path) -> None:
    """Write ``output/run_config.yaml`` (atomically: a kill never leaves half a file)."""
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".{RUN_CONFIG}.tmp"
    tmp.write_text(yaml.safe_dump(option_values(args), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, output / RUN_CONFIG)


def changed_options(saved: dict[str, Any], args: FinetuneArguments) -> list[str]:
    """``--name new (this run: old)`` for each fixed option whose value differs from ``saved``."""
    now = option_values(args)
    return [f"--{name.replace('_', '-')} {now[name]} (this run: {value})" for name, value in saved.items()
            if name not in MAY_CHANGE and name in now and now[name] != value]


def training_done(checkpoint: Path, t: TrainArguments) -> bool:
    """Whether ``checkpoint`` already holds the last step of the run that ``t`` asks for.

    The Trainer saves the last step whatever ``--save-steps``; resumed from it, it would train
    one step more. ``--max-steps`` sets the goal when given, else the checkpoint's own step count
    as long as ``--epochs`` has not grown.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    step = state.get("global_step", 0)
    if t.max_steps > 0:
        return step >= t.max_steps
    return step >= state.get("max_steps", step + 1) and t.epochs <= state.get("num_train_epochs", t.epochs)
