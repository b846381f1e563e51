"""Calibration and held-out evaluation data for GPTQ, from the user's own files.

Files are read by :mod:`telechat.records` (the one record reader): official SFT, ``messages``,
``text``/``data`` jsonl, one sample per record; or plain text, tokenized as one stream and cut
into ``seq_len`` windows. Conversations are tokenized with :class:`telechat.chat_format.ChatFormat`
(markers, ``<_end>``) so GPTQ sees the same ids the model sees when serving chats. The official
recipe calibrated on a single English sentence; here every sample is a real record, and too few
of them is an error.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from telechat.chat_format import ChatFormat
from telechat.errors import UserError
from telechat.records import is_jsonl, token_pieces

log = logging.getLogger(__name__)

MIN_SAMPLE_TOKENS = 16
"""Shorter records carry too little context to calibrate with; they are skipped."""
HELDOUT_FRACTION = 0.1
"""Share of the records (the file's tail) kept out of calibration for the perplexity report."""


class CalibrationError(UserError, ValueError):
    """The calibration file cannot provide what was asked; the message says what to change."""


@dataclass(frozen=True)
class CalibrationData:
    """Token id samples for GPTQ and the held-out token stream for the perplexity report."""

    samples: list[list[int]]
    heldout: list[int]


def calibration_records(path: Path, chat: ChatFormat) -> list[list[int]]:
    """Token ids of every record in ``path`` (one list per jsonl record, or one for plain text)."""
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    pieces = list(token_pieces(path, chat))
    if not pieces:
        raise CalibrationError(f"{path} is empty")
    return pieces if is_jsonl(path) else [[t for piece in pieces for t in piece]]


def _windows(ids: list[int], seq_len: int) -> list[list[int]]:
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


def load_calibration(
    path: str | Path,
    chat: ChatFormat,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
) -> CalibrationData:
    """``num_samples`` calibration samples of at most ``seq_len`` tokens plus a held-out stream.

    The last :data:`HELDOUT_FRACTION` of the records (of the tokens, for plain text) is held out;
    calibration samples are drawn at random (``seed``) from the rest, truncated to ``seq_len``.
    Raises :class:`CalibrationError` when fewer than ``num_samples`` usable samples remain.
    """
    path = Path(path)
    pool, heldout = _split(path, chat, seq_len)
    usable = [s for s in pool if len(s) >= MIN_SAMPLE_TOKENS]
    if len(usable) < num_samples:
        raise CalibrationError(
            f"{path} gives {len(usable)} calibration samples of {MIN_SAMPLE_TOKENS}..{seq_len} tokens "
            f"(after holding out {HELDOUT_FRACTION:.0%} for evaluation), fewer than the {num_samples} requested; "
            "GPTQ on too little data silently degrades the model. Add data, or lower --calib-samples "
            "(or --calib-seq-len, for plain text) knowingly")
    samples = random.Random(seed).sample(usable, num_samples)
    log.info("calibration: %d samples (%d tokens) from %s; %d held-out tokens", len(samples),
             sum(map(len, samples)), path, len(heldout))
    return CalibrationData(samples, heldout)


def _split(path: Path, chat: ChatFormat, seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Calibration pool (samples of at most ``seq_len`` tokens) and held-out token stream of ``path``."""
    records = calibration_records(path, chat)
    if len(records) == 1:  # plain text: one token stream
        ids = records[0]
        cut = len(ids) - max(int(len(ids) * HELDOUT_FRACTION), 2)
        return _windows(ids[:cut], seq_len), ids[cut:]
    cut = len(records) - max(int(len(records) * HELDOUT_FRACTION), 1)
    return [r[:seq_len] for r in records[:cut]], [t for r in records[cut:] for t in r]


def load_heldout(path: str | Path, chat: ChatFormat) -> list[int]:
    """The held-out tail of a calibration file alone (the same tokens :func:`load_calibration` holds
    out), for runs that calibrate nothing but report perplexity on it (FP8 with dynamic activations)."""
    return _split(Path(path), chat, seq_len=2**31)[1]  # one window: only the tail is wanted


def load_eval_tokens(path: str | Path, chat: ChatFormat) -> list[int]:
    """All records of an evaluation file as one token stream."""
    return [t for piece in token_pieces(path, chat) for t in piece]
