"""``telechat quantize`` / ``python -m jobs.quant``: GPTQ int4/int8 of a TeleChat checkpoint.

Recipe: read calibration (and held-out) data → perplexity of the original → GPTQ into a staging
folder next to ``--output`` → copy tokenizer and generation config → perplexity of the quantized
model → report → publish the folder as ``--output`` (:mod:`jobs.output`: a failure at any step
leaves no output, ``--overwrite`` keeps the files it does not write).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from jobs.output import check_output, copy_companions, owned_temp_dir, staged
from jobs.quiet import setup_logging
from telechat.errors import UserError

log = logging.getLogger(__name__)

GROUP_SIZES = (128, 64, 32)
"""Default ``--group-size`` candidates, largest first: 128 as the official int4/int8 releases, else
the largest that divides every Linear input width (GPTQ kernels take these sizes)."""


def build_parser(prog: str = "telechat quantize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="GPTQ-quantize a TeleChat checkpoint (GPTQModel) and report "
                                "perplexity before/after. Output: AutoGPTQ-compatible safetensors with "
                                "quantization_config in config.json and a quantize_config.json.")
    p.add_argument("--model", required=True, type=Path, help="source checkpoint folder (fp16/bf16/fp32)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="weight bits (default: 4)")
    p.add_argument("--group-size", type=int, help="columns per scale/zero group; -1 = per channel (default: 128, "
                   "as the official int4/int8 releases, or the largest of 64, 32 that divides every Linear input "
                   "width, else -1)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False,
                   help="act-order: quantize columns by decreasing activation (default: off, as official)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric quantization (default: on, as official)")
    p.add_argument("--calib", required=True, type=Path,
                   help="calibration data: official SFT jsonl (input/output), messages jsonl, text jsonl or plain text")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default: 128, the usual "
                   "GPTQ setting, with which int4 stays within 5%% perplexity; GPTQModel's generic advice of 256 "
                   "doubles the time)")
    p.add_argument("--calib-seq-len", type=int, default=2048, help="tokens per calibration sample at most (default: 2048)")
    p.add_argument("--output", type=Path, help="output folder (default: MODEL-GPTQ-Int{bits} beside the model)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --output: replace "
                   "the files this job writes, keep every other file")
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
    from telechat.model.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.model)
    if info.quantized:
        raise UserError(f"{args.model} is already quantized; pass the fp16/bf16 checkpoint it came from")
    if args.calib_samples < 1 or args.calib_seq_len < 2 or args.batch_size < 1:
        raise UserError("--calib-samples and --batch-size must be >= 1 and --calib-seq-len >= 2")
    widths = {k: info.config[k] for k in ("hidden_size", "ffn_hidden_size") if info.config.get(k)}
    if args.group_size is None:
        args.group_size = default_group_size(widths)
    elif args.group_size != -1 and args.group_size < 1:
        raise UserError("--group-size must be positive or -1 (per channel)")
    elif args.group_size != -1:
        bad = {k: v for k, v in widths.items() if v % args.group_size}
        if bad:
            raise UserError(f"--group-size {args.group_size} does not divide {bad} (Linear input widths); "
                            "pick a divisor or -1")
    args.output = args.output or args.model.with_name(f"{args.model.name}-GPTQ-Int{args.bits}")
    check_output(args.output, args.overwrite)


def default_group_size(widths: dict[str, int]) -> int:
    """The largest of :data:`GROUP_SIZES` that divides every width (-1, per channel, if none); says
    so when it is not the official 128."""
    size = next((g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())), -1)
    if size != GROUP_SIZES[0]:
        log.info("--group-size %d: the largest that divides every Linear input width (%s); the official %d does not",
                 size, ", ".join(f"{k} {v}" for k, v in widths.items()), GROUP_SIZES[0])
    return size


def run(args: argparse.Namespace) -> Path:
    """The quantization recipe; returns the output folder."""
    import torch

    from jobs.quant.calib import load_calibration, load_eval_tokens
    from jobs.quant.report import QuantReport, evaluate, weights_mb
    from telechat.chat_format import ChatFormat
    from telechat.model.checkpoint import DTYPES, resolve_device
    from telechat.model.loader import load_model
    from telechat.model.quantized import load_quantized
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

    from jobs.quant.gptq import quantize, sandbox  # heavy import (GPTQModel); after the cheap checks

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

    work = owned_temp_dir(Path(tempfile.gettempdir()), "gptq")
    log.info("GPTQ int%d, group size %d, on %s (GPTQModel's own output: %s)", args.bits, args.group_size, device,
             work / "gptqmodel.log")
    try:
        with staged(args.output.resolve()) as tmp:
            report.quant_seconds = quantize(
                args.model, tmp, data.samples, bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
                sym=args.sym, dtype=DTYPES[args.dtype], device=device, work=work, batch_size=args.batch_size,
            )
            log.info("quantized in %.1f s", report.quant_seconds)
            copy_companions(args.model, tmp)  # the tokenizer GPTQModel would re-save can differ
            report.size_quantized_mb = weights_mb(tmp)
            if not args.skip_eval:
                with sandbox(work):  # loading goes through GPTQModel too
                    report.ppl_quantized = evaluate(lambda: load_quantized(tmp, device=device), eval_tokens, eval_seq_len)
                log.info("quantized perplexity: %.3f (%+.2f%%)", report.ppl_quantized, report.ppl_change_pct)
            report.write(tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("wrote %s\n%s", args.output, report.markdown())
    return args.output


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``telechat quantize``; returns the exit code (2 on a usage or data error)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        run(args)
    except UserError as e:
        log.error("%s", e)
        return 2
    return 0
