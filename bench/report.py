"""Machine-readable benchmark results: the run's provenance plus every measurement row.

``write_json(path, rows)`` writes ``{"date", "command", "commit", "device", "torch", ..., "results": rows}``
(docs/conventions.md, benchmarks). The commit comes from ``git`` when the checkout has one, else
from ``BENCH_COMMIT`` (a copied tree on a GPU machine has no ``.git``); ``BENCH_COMMIT`` wins when set.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """``BENCH_COMMIT``, else the checkout's short commit (``-dirty`` with uncommitted tracked changes),
    else ``unknown``."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def device_name() -> str:
    """The first CUDA device's name, or ``cpu (N cores)``."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


@functools.cache
def run_info() -> dict:
    """Date (UTC, when first asked), command line, commit, device and torch version of this process."""
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]), "commit": git_commit(), "device": device_name(),
            "torch": torch.__version__}


def write_json(path: str | Path, rows: list[dict], **extra) -> None:
    """Write the run's provenance, ``extra`` and ``rows`` to ``path`` (replaced whole, never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**run_info(), **extra, "results": rows}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
