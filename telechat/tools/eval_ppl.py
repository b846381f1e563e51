"""``telechat eval-ppl``: perplexity per context length and RoPE scaling mode (issue 9, docs/model.md, RoPE).

For every length ``L`` and mode (``none`` | ``ntk`` | ``ntk+scaling``) the evaluator scores ``K``
non-overlapping windows of ``L`` tokens taken from the start of the data. A window has the
official single-pass semantics: its RoPE parameters are those of a length-``L`` sequence, every
position sees the whole window prefix. Memory stays bounded at any ``L``: the window goes through
the model ``--chunk`` tokens at a time with a KV cache (``rope_length=L`` keeps all chunks on the
same rotary base), and logits exist for ``DEFAULT_CHUNK`` positions at a time only (both in
:func:`telechat.tools.perplexity.window_nll`). So 7B at 96K
needs the weights (14.4 GB) plus the window's KV cache (96K × 30 layers × 2 × 4096 × 2 B ≈ 47 GB).

The result is printed as a Markdown table shaped like the seed's (rows = modes, columns =
lengths) and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from telechat.chat_format import ChatFormat
from telechat.model.config import ROPE_MODES
from telechat.errors import UserError
from telechat.tools.perplexity import window_nll
from telechat.records import token_pieces

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 4096
"""Tokens per forward chunk: bounds attention/MLP activations independent of the window length."""



# ---------------------------------------------------------------------------------------------
# evaluation grid


@dataclass(frozen=True)
class PplResult:
    """Perplexity of one (mode, length) cell and the RoPE parameters it ran with."""

    mode: str
    length: int
    ppl: float
    mean_nll: float
    tokens: int
    windows: int
    alpha: float
    base: float
    mscale: float


@contextmanager
def rope_mode(model, mode: str) -> Iterator[None]:
    """Run ``model`` with another RoPE scaling mode, restoring the loaded one afterwards.

    The rotary tables are rebuilt from ``model.config`` at every forward, so switching between
    windows is safe and avoids reloading the weights once per mode.
    """
    check_modes([mode])
    config = model.config
    loaded = config.rope_mode
    config.rope_mode = mode
    try:
        yield
    finally:
        config.rope_mode = loaded


def check_modes(modes: Sequence[str]) -> None:
    """Raise :class:`UserError` naming the first unknown mode."""
    for mode in modes:
        if mode not in ROPE_MODES:
            raise UserError(f"unknown RoPE mode {mode!r}; choose from {', '.join(ROPE_MODES)}")


def check_enough_tokens(num_tokens: int, lengths: Sequence[int]) -> None:
    """Raise :class:`UserError` saying how many tokens there are when the longest window does not fit."""
    longest = max(lengths)
    if num_tokens < longest:
        raise UserError(f"the data has {num_tokens} tokens, fewer than the longest length {longest}; "
                        f"use more text or lengths <= {num_tokens}")


def window_counts(num_tokens: int, lengths: Sequence[int], windows: int) -> dict[int, int]:
    """Windows per length: ``windows`` where the data has room, fewer (at least one) otherwise."""
    check_enough_tokens(num_tokens, lengths)
    counts = {length: min(windows, num_tokens // length) for length in lengths}
    short = {length: c for length, c in counts.items() if c < windows}
    if short:
        log.warning("the data (%d tokens) holds fewer than %d windows at some lengths: %s", num_tokens, windows,
                    ", ".join(f"{length}: {c}" for length, c in short.items()))
    return counts


def evaluate(
    model,
    token_ids: Sequence[int] | torch.Tensor,
    lengths: Sequence[int],
    modes: Sequence[str],
    *,
    windows: int = 4,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    progress: bool = True,
) -> list[PplResult]:
    """Perplexity of every (mode, length): the first ``windows`` non-overlapping windows of each length."""
    check_modes(modes)
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    counts = window_counts(ids.numel(), lengths, windows)
    rotary = model.transformer.rotary
    results = []
    with tqdm(total=len(modes) * sum(L * counts[L] for L in lengths), unit="tok", unit_scale=True,
              desc="eval-ppl", disable=not progress) as bar:
        for mode in modes:
            with rope_mode(model, mode):
                for length in lengths:
                    bar.set_postfix_str(f"{mode} L={length}")
                    nll, scored = 0.0, 0
                    for w in range(counts[length]):
                        s, c = window_nll(model, ids[w * length : (w + 1) * length],
                                          prefill_chunk=prefill_chunk, on_chunk=bar.update)
                        nll, scored = nll + s, scored + c
                    p = rotary.params(length)
                    mean = nll / scored
                    results.append(PplResult(mode, length, math.exp(mean), mean, scored, counts[length],
                                             p.alpha, p.base, p.mscale))
                    log.info("%s L=%d: ppl %.3f (%d tokens, alpha %g, mscale %.4f)", mode, length,
                             math.exp(mean), scored, p.alpha, p.mscale)
    return results


def markdown_table(results: Sequence[PplResult]) -> str:
    """Rows = modes, columns = lengths, cells = perplexity (the seed's long-context table shape)."""
    lengths = list(dict.fromkeys(r.length for r in results))
    modes = list(dict.fromkeys(r.mode for r in results))
    cell = {(r.mode, r.length): r.ppl for r in results}
    lines = ["| mode | " + " | ".join(str(L) for L in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for mode in modes:
        lines.append(f"| {mode} | " + " | ".join(_fmt(cell[mode, L]) for L in lengths) + " |")
    return "\n".join(lines)


def _fmt(ppl: float) -> str:
    return "inf" if math.isinf(ppl) else f"{ppl:.2f}" if ppl < 1000 else f"{ppl:.0f}"


# ---------------------------------------------------------------------------------------------
# data


def load_token_ids(path: str | Path, tokenizer, *, generation_config: dict | None = None,
                   needed: int | None = None) -> list[int]:
    """Token ids of a text or jsonl file (:mod:`telechat.records`), stopping once ``needed`` ids are read.

    Conversations are encoded with the chat format exactly as fine-tuning sees them; documents
    (``text`` / ``data``, TeleChat-PTD) end with the tokenizer's eos token.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path} does not exist" if not path.exists() else f"--data {path} is not a file")
    ids: list[int] = []
    for piece in token_pieces(path, ChatFormat(tokenizer, generation_config)):
        ids.extend(piece)
        if needed is not None and len(ids) >= needed:
            break
    if not ids:
        raise UserError(f"--data {path} holds no text")
    return ids


# ---------------------------------------------------------------------------------------------
# command line


def parse_lengths(text: str) -> list[int]:
    """``"2048,4K,96k"`` → ``[2048, 4096, 98304]`` (K = 1024), sorted and de-duplicated."""
    lengths = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        scale = 1024 if part[-1] in "kK" else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise UserError(f"--lengths: {part!r} is not a token count (e.g. 2048 or 4K)") from None
        if value < 2:
            raise UserError(f"--lengths: {part!r} is too short; a window needs at least 2 tokens")
        lengths.add(value)
    if not lengths:
        raise UserError("--lengths is empty; e.g. --lengths 2048,4096,8192")
    return sorted(lengths)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telechat eval-ppl", description=(
        "Perplexity per context length and RoPE scaling mode, as a Markdown table (rows = modes, columns = "
        "lengths) and JSON. Each length scores --windows non-overlapping windows from the start of --data."))
    p.add_argument("--model", required=True, help="TeleChat checkpoint folder")
    p.add_argument("--data", required=True, help="text file, or jsonl with input/output, messages, text or data")
    p.add_argument("--lengths", required=True, help="context lengths, e.g. 2048,4096,8K,96K")
    p.add_argument("--modes", default=",".join(ROPE_MODES), help=f"comma-separated of {', '.join(ROPE_MODES)}")
    p.add_argument("--training-seqlen", type=int, help="override the checkpoint's training_seqlen "
                   "(set it to the length the model was last fine-tuned at)")
    p.add_argument("--base-seqlen", type=int, help="override the NTK base length (7B 4096, 12B 8192)")
    p.add_argument("--windows", type=int, default=4, help="windows per length (default 4)")
    p.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"tokens per KV-cached forward chunk; 0 = whole window at once (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``telechat eval-ppl``; returns the exit code."""
    args = build_parser().parse_args(argv)
    lengths = parse_lengths(args.lengths)
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    check_modes(modes)
    if args.windows < 1 or args.chunk < 0:
        raise UserError("--windows must be >= 1 and --chunk >= 0")
    data = Path(args.data)

    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.model.loader import load_model
    from telechat.tokenizer import load_tokenizer

    # Data problems surface before the (possibly 14 GB) weights are loaded.
    inspect_checkpoint(args.model)
    tok_dir = Path(args.tokenizer or args.model)
    try:
        tokenizer = load_tokenizer(tok_dir)
    except FileNotFoundError as e:
        raise UserError(f"{e}; pass --tokenizer FOLDER") from e
    gen_file = Path(args.model) / "generation_config.json"
    generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
    ids = load_token_ids(data, tokenizer, generation_config=generation, needed=args.windows * lengths[-1])
    check_enough_tokens(len(ids), lengths)
    model = load_model(args.model, device=args.device, dtype=args.dtype, training_seqlen=args.training_seqlen,
                       base_seqlen=args.base_seqlen)
    log.info("%d tokens read from %s; training_seqlen %d, base_seqlen %d", len(ids), data,
             model.config.training_seqlen, model.config.base_seqlen)
    results = evaluate(model, ids, lengths, modes, windows=args.windows, prefill_chunk=args.chunk or None,
                       progress=not args.no_progress)
    table = markdown_table(results)
    print(table)
    if args.output:
        report = {
            "model": str(args.model), "data": str(data), "tokens_read": len(ids),
            "training_seqlen": model.config.training_seqlen, "base_seqlen": model.config.base_seqlen,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device), "windows": args.windows, "chunk": args.chunk,
            "results": [asdict(r) for r in results], "table": table,
        }
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log.info("wrote %s", out)
    return 0
