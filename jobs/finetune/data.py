"""Reading SFT data: official jsonl, OpenAI ``messages`` jsonl, and weighted ``data.json`` mixes.

Formats (one JSON object per line; blank lines are skipped):

- official: ``{"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2"}`` (SPEC.md §7);
- OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``.

A ``data.json`` maps jsonl paths (relative to the data.json folder, or to the working directory
as the official scripts run) to sampling weights: a weight ``w < 1`` keeps each conversation with
probability ``w``; ``w >= 1`` keeps ``floor(w)`` copies plus one more with probability ``frac(w)``
(the official rule). Every malformed line of every file is reported as ``file:line: reason`` and
nothing is trained: a bad file is never skipped silently.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from telechat.chat_format import messages_from_official, validate_messages

log = logging.getLogger(__name__)

MAX_REPORTED = 20
"""Bad lines listed in one error message; the total count is always given."""


class DataError(ValueError):
    """The training data cannot be used; the message lists ``file:line: reason`` for each problem."""


@dataclass(frozen=True)
class Conversation:
    """One training conversation (ends with an assistant answer) and where it came from."""

    messages: list[dict[str, str]]
    source: str  # "file:line", for error messages during tokenization


def _parse_line(text: str) -> list[dict[str, str]]:
    """Messages of one jsonl line; ``ValueError`` with a readable reason when malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        turns = validate_messages(messages)
        if turns[-1][0] != "assistant":
            raise ValueError("the last message must be the assistant answer to train on")
        return [{"role": role, "content": content} for role, content in turns]
    if "input" in obj:
        if "output" not in obj:
            raise ValueError("has 'input' but no 'output' (an inference prompt file such as test.jsonl?)")
        if not isinstance(obj["output"], str) or not obj["output"]:
            raise ValueError("'output' must be a non-empty string")
        return messages_from_official(obj["input"], obj["output"])
    raise ValueError(f"expected keys 'input'+'output' (official) or 'messages' (OpenAI), got {sorted(obj)}")


def read_jsonl(path: str | Path) -> list[Conversation]:
    """All conversations of one jsonl file; raises :class:`DataError` listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    conversations, errors = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                conversations.append(Conversation(_parse_line(text), f"{path}:{lineno}"))
            except ValueError as e:
                errors.append(f"{path}:{lineno}: {e}")
    if errors:
        raise DataError(_report(errors))
    if not conversations:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return conversations


def _report(errors: list[str]) -> str:
    shown = "\n".join(errors[:MAX_REPORTED])
    more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
    return f"{len(errors)} malformed line(s); fix them and run again:\n{shown}{more}"


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


def load_conversations(data: str | Path, seed: int) -> list[Conversation]:
    """Conversations of a jsonl file or a weighted data.json mix, shuffled with ``seed``.

    All files are validated before any sampling, so every bad line of every file is reported at once.
    """
    data = Path(data)
    rng = random.Random(seed)
    if data.suffix == ".json":
        mix = read_mix(data)
        per_file, errors = {}, []
        for file in mix:
            try:
                per_file[file] = read_jsonl(file)
            except DataError as e:
                errors.append(str(e))
        if errors:
            raise DataError("\n".join(errors))
        conversations = [c for file, weight in mix.items() for c in per_file[file] for _ in range(_copies(weight, rng))]
        log.info("data mix %s: %s -> %d conversations", data,
                 ", ".join(f"{f.name} x{w:g} ({len(per_file[f])})" for f, w in mix.items()), len(conversations))
        if not conversations:
            raise DataError(f"{data}: the weights sampled no conversation at all; raise them")
    else:
        conversations = read_jsonl(data)
        log.info("data %s: %d conversations", data, len(conversations))
    rng.shuffle(conversations)
    return conversations


def _copies(weight: float, rng: random.Random) -> int:
    whole = math.floor(weight)
    return whole + (1 if rng.random() < weight - whole else 0)
