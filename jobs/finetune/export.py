"""Atomic output folders and the finishing touches of an exported checkpoint.

Every final folder is written as a hidden sibling ``.NAME.tmp`` and renamed into place, so a
crash never leaves a half-written ``model/`` or ``adapter/`` that looks usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SKIPPED_FILES = ("config.json", "README.md")
"""Rewritten by ``save_pretrained`` or specific to the source model: never copied over."""


def temp_dir(final: Path) -> Path:
    """The temporary sibling a final folder is written to (same name on every rank)."""
    return final.with_name(f".{final.name}.tmp")


def publish(tmp: Path, final: Path) -> Path:
    """Move a finished ``tmp`` folder to ``final``, replacing an older one."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def copy_companions(source: Path, dest: Path) -> list[str]:
    """Copy the non-weight files of a checkpoint folder (tokenizer files, generation_config.json,
    the official remote-code ``*.py``) so ``dest`` loads like ``source`` in our runtime and the
    official code. Returns the copied names."""
    copied = []
    for file in sorted(source.iterdir()):
        if not file.is_file() or file.name in SKIPPED_FILES or file.name.endswith(".index.json"):
            continue
        if file.suffix in WEIGHT_SUFFIXES:
            continue
        shutil.copy2(file, dest / file.name)
        copied.append(file.name)
    return copied


def write_generation_config(dest: Path, ids: dict[str, int]) -> None:
    """A generation_config.json for a model with no source one (``--from-scratch``): the chat
    marker ids the official code reads, greedy decoding."""
    config = {"do_sample": False, "use_cache": True, **ids}
    (dest / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
