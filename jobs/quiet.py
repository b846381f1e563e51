"""Quiet job logs: our own lines (INFO on rank 0, errors only on the other ranks), progress bars
on rank 0 only, third-party chatter kept out.

What is silenced, and why it is noise: libraries' INFO logs (warnings and errors still show);
library deprecation notices (``FutureWarning`` /
``DeprecationWarning``; torch's c10d alone printed 84 per ZeRO-3 run) concern the libraries' own
calls, nothing a user can change; transformers' advisory warnings (e.g. sampling flags in a
greedy generation_config.json); GPTQModel's import banner and environment notes, which PEFT
triggers in every LoRA run, and its per-module progress (1,660 lines for a 2-layer model), which
:func:`captured_output` sends to a file. ``TRANSFORMERS_VERBOSITY=info`` brings transformers back.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from telechat.errors import UserError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TAIL_LINES = 20
"""Lines of captured third-party output shown when the captured code fails."""


def rank() -> int:
    """This process's global rank under torchrun or the DeepSpeed launcher (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging() -> None:
    """Levels, format and third-party silence for a job process; the first call of a job's ``main``."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.WARNING)
    for ours in ("jobs", "telechat"):  # every rank would repeat rank 0's notes about the same data
        logging.getLogger(ours).setLevel(logging.INFO if rank() == 0 else logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    if rank() != 0:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' bars follow this at import
    if "transformers" in sys.modules:  # already imported (a job run in-process): apply directly
        from transformers.utils import logging as hf_logging

        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            hf_logging.set_verbosity_error()
        if rank() != 0:
            hf_logging.disable_progress_bar()


@contextlib.contextmanager
def captured_output(log_file: Path | None = None) -> Iterator[None]:
    """Send what third-party code prints to stdout/stderr inside the block to ``log_file`` (or
    nowhere). Our logging keeps its own stream; if the block fails unexpectedly (not a
    :class:`UserError`), the file's tail is logged."""
    sink = open(log_file, "a", encoding="utf-8") if log_file else open(os.devnull, "w", encoding="utf-8")
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    except UserError:
        raise  # our own message says what to fix
    except Exception:
        sink.flush()
        if log_file is not None:
            lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
            tail = [line for line in lines if line.strip()][-TAIL_LINES:]
            log.error("last lines of the library output (%s):\n%s", log_file, "\n".join(tail))
        raise
    finally:
        sink.close()


def import_gptqmodel_quietly() -> None:
    """Import GPTQModel, when installed, without its banner and environment notes (PEFT imports it
    while adding LoRA layers, printing them into every LoRA run's log)."""
    if importlib.util.find_spec("gptqmodel") is None:
        return
    # GPTQModel sizes its CPU worker pool as (cores + 1) // 2 but asks for 2 workers when loading,
    # so on a 2-core machine it fails ("requests 2 workers but parent 'cpu' only has 1"). Read at import.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    with captured_output():
        importlib.import_module("gptqmodel")
