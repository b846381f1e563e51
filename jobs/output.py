"""Output folders of every job (finetune, merge-lora, quantize): never clobber, publish atomically,
respect the umask, clean up after killed runs.

- An existing, non-empty output folder is refused unless ``--overwrite`` (:func:`check_output`).
- A job writes into a staging folder beside the output and publishes it (:func:`staged`): a new
  output is one rename; over an existing folder (``--overwrite``) each file the job wrote
  replaces its namesake with ``os.replace`` and every other file stays. Nothing a job did not
  write is ever deleted.
- Staging and scratch folders are named ``.telechat-tmp-<pid>-<host>-<label>``; one whose process
  is gone (a SIGKILL, a power cut) is removed by the next job that uses the same parent folder.
- Published files get mode 0666 and folders 0777, minus the umask, as anything the user creates
  (libraries write some files 0600 and ``mkdtemp`` folders 0700).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from telechat.errors import UserError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".telechat-tmp-"
_TEMP_NAME = re.compile(r"^\.telechat-tmp-(\d+)-([A-Za-z0-9_]+)-")
COMPANION_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
"""Non-weight files a checkpoint derived from another carries over verbatim (with the remote-code ``*.py``)."""


def is_nonempty_dir(path: Path) -> bool:
    """Whether ``path`` is a folder holding anything."""
    return path.is_dir() and any(path.iterdir())


def check_output(path: Path, overwrite: bool, flag: str = "--output") -> None:
    """Refuse a file, or an existing non-empty folder without ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder")
    if not overwrite and is_nonempty_dir(path):
        raise UserError(f"{flag} {path} exists and is not empty; pass --overwrite to replace the files this job "
                        f"writes there (other files are kept) or choose another {flag}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove this host's ``.telechat-tmp-*`` folders in ``parent`` whose process is gone; returns them."""
    removed = []
    for path in parent.iterdir() if parent.is_dir() else ():
        found = _TEMP_NAME.match(path.name)
        if found and found.group(2) == _host() and not _alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d folder(s) left by killed jobs in %s", len(removed), parent)
    return removed


def owned_temp_dir(parent: Path, label: str) -> Path:
    """A new empty folder ``parent/.telechat-tmp-<pid>-<host>-<label>`` (stale ones removed first)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent)
    path = parent / f"{TEMP_PREFIX}{os.getpid()}-{_host()}-{label}"
    shutil.rmtree(path, ignore_errors=True)  # our own pid: a leftover of this very process
    path.mkdir()
    return path


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``final``; publish it when the block succeeds, remove it always."""
    tmp = owned_temp_dir(final.parent, final.name)
    try:
        yield tmp
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Move the files of ``tmp`` to ``final``: one rename when ``final`` is new or empty, else file by file."""
    apply_umask(tmp)
    if not is_nonempty_dir(final):
        if final.is_dir():
            final.rmdir()
        tmp.rename(final)
        return
    for src in sorted(p for p in tmp.rglob("*") if not p.is_dir()):
        dest = final / src.relative_to(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything below it the modes a plain create would: 0666 / 0777 minus the umask."""
    mask = _umask()
    for path in (root, *root.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def copy_companions(source: Path, dest: Path) -> list[str]:
    """Copy :data:`COMPANION_FILES` and the official remote-code ``*.py`` of ``source`` into ``dest``,
    so a derived checkpoint loads like its source in our runtime and in the official code."""
    names = [p.name for p in sorted(source.iterdir())
             if p.is_file() and (p.name in COMPANION_FILES or p.suffix == ".py")]
    for name in names:
        shutil.copy2(source / name, dest / name)
    return names
