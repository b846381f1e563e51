"""``telechat quantize`` / ``python -m jobs.quant``: GPTQ int4/int8 of a TeleChat checkpoint.

Recipe: read calibration (and held-out) data → perplexity of the original → GPTQ into a temporary
folder next to ``--output`` → copy tokenizer and generation config → perplexity of the quantized
model → report → rename the folder to ``--output``. A failure at any step leaves no output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from telechat.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
"""Copied verbatim from the source folder (the tokenizer GPTQModel would re-save can differ)."""


def build_parser(prog: str = "telechat quantize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="GPTQ-quantize a TeleChat checkpoint (GPTQModel) and report "
                                "perplexity before/after. Output: AutoGPTQ-compatible safetensors with "
                                "quantization_config in config.json and a quantize_config.json.")
    p.add_argument("--model", required=True, type=Path, help="source checkpoint folder (fp16/bf16/fp32)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="weight bits (default: 4)")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale/zero group; -1 = per channel "
                   "(default: 128, as the official int4/int8 releases)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False,
                   help="act-order: quantize columns by decreasing activation (default: off, as official)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric quantization (default: on, as official)")
    p.add_argument("--calib", required=True, type=Path,
                   help="calibration data: official SFT jsonl (input/output), messages jsonl, text jsonl or plain text")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default: 128)")
    p.add_argument("--calib-seq-len", type=int, default=2048, help="tokens per calibration sample at most (default: 2048)")
    p.add_argument("--output", type=Path, help="output folder (default: MODEL-GPTQ-Int{bits} beside the model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="float16", help="dtype the model is quantized in (default: float16, as official)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size (default: 1, no padding)")
    p.add_argument("--eval-data", type=Path, help="held-out text for the perplexity report "
                   "(default: the last 10%% of --calib, never used for calibration)")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="perplexity window in tokens (default: 2048)")
    p.add_argument("--eval-max-tokens", type=int, default=32768, help="evaluate at most this many tokens (default: 32768)")
    p.add_argument("--skip-eval", action="store_true", help="no perplexity report (saves two model loads)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample draw")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Cross-field checks, before any model is loaded."""
    from telechat.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.model)
    if info.quantized:
        raise UserError(f"{args.model} is already quantized; pass the fp16/bf16 checkpoint it came from")
    if args.calib_samples < 1 or args.calib_seq_len < 2 or args.batch_size < 1:
        raise UserError("--calib-samples and --batch-size must be >= 1 and --calib-seq-len >= 2")
    if args.group_size != -1 and args.group_size < 1:
        raise UserError("--group-size must be positive or -1 (per channel)")
    if args.group_size != -1:
        cfg = info.config
        widths = {"hidden_size": cfg.get("hidden_size"), "ffn_hidden_size": cfg.get("ffn_hidden_size")}
        bad = {k: v for k, v in widths.items() if v and v % args.group_size}
        if bad:
            raise UserError(f"--group-size {args.group_size} does not divide {bad} (Linear input widths); "
                            "pick a divisor or -1")
    args.output = args.output or args.model.with_name(f"{args.model.name}-GPTQ-Int{args.bits}")
    if args.output.exists() and not args.overwrite:
        raise UserError(f"{args.output} exists; pass --overwrite to replace it or choose another --output")


def run(args: argparse.Namespace) -> Path:
    """The quantization recipe; returns the output folder."""
    import torch

    from jobs.quant.calib import load_calibration, load_eval_tokens
    from jobs.quant.report import QuantReport, evaluate, weights_mb
    from telechat.chat_format import ChatFormat
    from telechat.checkpoint import DTYPES, load_model, resolve_device
    from telechat.quantized import load_quantized
    from telechat.tokenizer import load_tokenizer

    _check_args(args)
    device = resolve_device(args.device)
    if args.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {args.dtype!r}; use float16, bfloat16 or float32")
    gen_file = args.model / "generation_config.json"
    generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    chat = ChatFormat(load_tokenizer(args.model), generation)
    data = load_calibration(args.calib, chat, args.calib_samples, args.calib_seq_len, seed=args.seed)
    eval_tokens = load_eval_tokens(args.eval_data, chat) if args.eval_data else data.heldout
    eval_tokens = eval_tokens[: args.eval_max_tokens]
    eval_seq_len = min(args.eval_seq_len, max(len(eval_tokens), 2))

    from jobs.quant.gptq import quantize  # heavy import (GPTQModel); after the cheap checks

    report = QuantReport(
        model=str(args.model), output=str(args.output), bits=args.bits, group_size=args.group_size,
        desc_act=args.desc_act, sym=args.sym, calib_file=str(args.calib), calib_samples=len(data.samples),
        calib_tokens=sum(map(len, data.samples)), quant_seconds=0.0,
        eval_data=str(args.eval_data or f"{args.calib} (held-out tail)"), eval_tokens=len(eval_tokens),
        eval_seq_len=eval_seq_len, size_original_mb=weights_mb(args.model),
    )
    if not args.skip_eval:
        report.ppl_original = evaluate(lambda: load_model(args.model, device=device), eval_tokens, eval_seq_len)
        log.info("original perplexity: %.3f", report.ppl_original)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.output.name}-", dir=args.output.parent))
    try:
        report.quant_seconds = quantize(
            args.model, tmp, data.samples, bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
            sym=args.sym, dtype=DTYPES[args.dtype], device=device, batch_size=args.batch_size,
        )
        for name in TOKENIZER_FILES:
            if (args.model / name).is_file():
                shutil.copy2(args.model / name, tmp / name)
        report.size_quantized_mb = weights_mb(tmp)
        if not args.skip_eval:
            report.ppl_quantized = evaluate(lambda: load_quantized(tmp, device=device), eval_tokens, eval_seq_len)
            log.info("quantized perplexity: %.3f (%+.2f%%)", report.ppl_quantized, report.ppl_change_pct)
        report.write(tmp)
        if args.output.exists():
            shutil.rmtree(args.output)
        tmp.rename(args.output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("wrote %s\n%s", args.output, report.markdown())
    return args.output


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``telechat quantize``; returns the exit code (2 on a usage or data error)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        log.error("%s", e)
        return 2
    return 0
