"""Reading SFT data: official jsonl, OpenAI ``messages`` jsonl, and weighted ``data.json`` mixes.

Lines are parsed by :mod:`telechat.records` (the one record reader); fine-tuning takes
conversations that end with an answer only. A ``data.json`` maps jsonl paths (relative to the
data.json folder, or to the working directory as the official scripts run) to sampling weights:
a weight ``w < 1`` keeps each conversation with probability ``w``; ``w >= 1`` keeps ``floor(w)``
copies plus one more with probability ``frac(w)`` (the official rule). Every malformed line of
every file is reported as ``file:line: reason`` and nothing is trained: a bad file is never
skipped silently.

Held-out conversations are chosen before the weights make copies, so no conversation is both
trained on and evaluated.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

from telechat.errors import UserError
from telechat.records import Record, RecordError, read_records

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """The training data cannot be used; the message lists ``file:line: reason`` for each problem."""


def read_jsonl(path: str | Path) -> list[Record]:
    """All conversations of one jsonl file; raises :class:`DataError` listing every bad line."""
    try:
        return read_records(path, prompts=False, documents=False)
    except RecordError as e:
        raise DataError(str(e)) from None


def read_mix(path: str | Path) -> dict[Path, float]:
    """Parse a data.json of ``{jsonl path: weight}``; paths resolved as the module doc says."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not spec:
        raise DataError(f"{path}: expected a non-empty object of {{\"file.jsonl\": weight}}")
    mix, errors = {}, []
    for name, weight in spec.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            errors.append(f"{path}: entry {name!r}: weight must be a positive number, got {weight!r}")
            continue
        candidates = [path.parent / name, Path(name)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            errors.append(f"{path}: entry {name!r}: no such file (looked at {', '.join(map(str, candidates))})")
            continue
        mix[found] = float(weight)
    if errors:
        raise DataError("\n".join(errors))
    return mix


def load_conversations(data: str | Path, seed: int, eval_split: float = 0.0) -> tuple[list[Record], list[Record]]:
    """``(train, held_out)`` conversations of a jsonl file or a weighted data.json mix, shuffled with ``seed``.

    ``eval_split`` of the distinct conversations is held out first (each scored once); only the
    rest is weighted, so the weights' copies never reach the held-out set. All files are
    validated before any sampling, so every bad line of every file is reported at once.
    """
    data = Path(data)
    mix = read_mix(data) if data.suffix == ".json" else {data: 1.0}
    per_file, errors = {}, []
    for file in mix:
        try:
            per_file[file] = read_jsonl(file)
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise DataError("\n".join(errors))
    rng = random.Random(seed)
    pool = [(file, c) for file in mix for c in per_file[file]]
    rng.shuffle(pool)
    n_eval = int(len(pool) * eval_split)
    held_out = [c for _, c in pool[:n_eval]]
    train = [c for file, c in pool[n_eval:] for _ in range(_copies(mix[file], rng))]
    rng.shuffle(train)
    if data.suffix == ".json":
        log.info("data mix %s: %s -> %d training conversations", data,
                 ", ".join(f"{f.name} x{w:g} ({len(per_file[f])})" for f, w in mix.items()), len(train))
    else:
        log.info("data %s: %d conversations", data, len(pool))
    if n_eval:
        log.info("held out %d of %d distinct conversations for evaluation", n_eval, len(pool))
    elif eval_split:
        log.warning("--eval-split %g of %d conversations holds out none; eval is skipped", eval_split, len(pool))
    if not train:
        raise DataError(f"{data}: the weights sampled no training conversation at all; raise them")
    return train, held_out


def _copies(weight: float, rng: random.Random) -> int:
    whole = math.floor(weight)
    return whole + (1 if rng.random() < weight - whole else 0)
