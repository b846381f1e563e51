"""``telechat quantize`` / ``python -m jobs.quant``: GPTQ int4/int8 or FP8 weights of a TeleChat checkpoint.

Recipe: read calibration (and held-out) data → perplexity and greedy decodes of the original →
quantize into a staging folder next to ``--output`` (GPTQ: GPTQModel on calibration samples; FP8:
a streaming pass over the weights, :mod:`jobs.quant.fp8`) → copy tokenizer and generation config →
perplexity and greedy decodes of the quantized model → report → publish the folder as ``--output``
(:mod:`jobs.output`: a failure at any step leaves no output, ``--overwrite`` keeps the files it
does not write). There is no ``--resume``: FP8 takes minutes, and GPTQModel cannot continue a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from jobs.output import check_output, copy_companions, owned_temp_dir, staged
from jobs.quiet import setup_logging
from telechat.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("gptq", "fp8")
GROUP_SIZES = (128, 64, 32)
"""Default ``--group-size`` candidates, largest first: 128 as the official int4/int8 releases, else
the largest that divides every Linear input width (GPTQ kernels take these sizes)."""


def build_parser(prog: str = "telechat quantize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Quantize a TeleChat checkpoint and report perplexity and "
                                "greedy agreement before/after. gptq: GPTQModel int4/int8, AutoGPTQ-compatible "
                                "safetensors with quantization_config in config.json and a quantize_config.json. "
                                "fp8: FP8 E4M3 weights per output channel in the compressed-tensors format "
                                "(llm-compressor's FP8_DYNAMIC; loads in vLLM too), no calibration needed; served "
                                "with FP8 GEMMs on compute capability 8.9+ (Ada/Hopper).")
    p.add_argument("--model", required=True, type=Path, help="source checkpoint folder (fp16/bf16/fp32)")
    p.add_argument("--method", choices=METHODS, default="gptq", help="gptq (int4/int8, needs --calib) or fp8 "
                   "(default: gptq)")
    p.add_argument("--bits", type=int, choices=(4, 8), help="GPTQ weight bits (default: 4); fp8 is 8-bit")
    p.add_argument("--group-size", type=int, help="GPTQ: columns per scale/zero group; -1 = per channel (default: "
                   "128, as the official int4/int8 releases, or the largest of 64, 32 that divides every Linear input "
                   "width, else -1)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ act-order: quantize columns by decreasing activation (default: off, as official)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ symmetric quantization (default: on, as official)")
    p.add_argument("--activations", choices=("dynamic", "static"), default="dynamic",
                   help="fp8: activation scales computed per token at run time (dynamic, the default: no "
                   "calibration) or one per Linear from --calib (static)")
    p.add_argument("--quantize-head", action="store_true",
                   help="fp8: store lm_head in FP8 too (per output channel). A batch-1 decode step reads the whole "
                   "head (9%% of the 7B's bf16 weights, a sixth of what its FP8 steps read with the head dense): "
                   "faster small-batch decode for a small quality cost the report measures. The head is written "
                   "untied (the embeddings stay dense); vLLM serves it dequantized through our plugin. Default: "
                   "dense, as llm-compressor's FP8_DYNAMIC")
    p.add_argument("--calib", type=Path, help="calibration data (required by gptq and fp8 --activations static; "
                   "its held-out tail is the default --eval-data): official SFT jsonl (input/output), messages "
                   "jsonl, text jsonl or plain text")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default: 128, the usual "
                   "GPTQ setting, with which int4 stays within 5%% perplexity; GPTQModel's generic advice of 256 "
                   "doubles the time)")
    p.add_argument("--calib-seq-len", type=int, default=2048, help="tokens per calibration sample at most (default: 2048)")
    p.add_argument("--output", type=Path, help="output folder (default beside the model: MODEL-GPTQ-Int{bits}, "
                   "MODEL-FP8-Dynamic or MODEL-FP8)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --output: replace "
                   "the files this job writes, keep every other file")
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cuda, cuda:N or cpu")
    p.add_argument("--dtype", help="gptq: dtype the model is quantized in (default: float16, as official); fp8: "
                   "dtype of the tensors left dense (embeddings, norms, biases, head; default: as in --model)")
    p.add_argument("--batch-size", type=int, default=1, help="GPTQ calibration batch size (default: 1, no padding)")
    p.add_argument("--eval-data", type=Path, help="held-out text for the perplexity report "
                   "(default: the last 10%% of --calib, never used for calibration)")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="perplexity window in tokens (default: 2048)")
    p.add_argument("--eval-max-tokens", type=int, default=32768, help="evaluate at most this many tokens (default: 32768)")
    p.add_argument("--skip-eval", action="store_true", help="no perplexity or greedy report (saves two model loads)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample draw")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Cross-field checks, before any model is loaded."""
    from telechat.model.checkpoint import DTYPES, inspect_checkpoint

    info = inspect_checkpoint(args.model)
    if info.quantized:
        raise UserError(f"{args.model} is already quantized; pass the fp16/bf16 checkpoint it came from")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {args.dtype!r}; use float16, bfloat16 or float32")
    if args.calib_samples < 1 or args.calib_seq_len < 2 or args.batch_size < 1:
        raise UserError("--calib-samples and --batch-size must be >= 1 and --calib-seq-len >= 2")
    if args.method == "fp8":
        _check_fp8_args(args)
        args.output = args.output or args.model.with_name(
            f"{args.model.name}-FP8{'-Dynamic' if args.activations == 'dynamic' else ''}")
    else:
        if args.quantize_head:
            raise UserError("--quantize-head is an fp8 setting (GPTQ keeps lm_head dense); drop it or use --method fp8")
        if args.calib is None:
            raise UserError("--method gptq needs --calib (calibration data)")
        args.bits = args.bits or 4
        args.dtype = args.dtype or "float16"
        _check_group_size(args, info.config)
        args.output = args.output or args.model.with_name(f"{args.model.name}-GPTQ-Int{args.bits}")
    check_output(args.output, args.overwrite)


def _check_fp8_args(args: argparse.Namespace) -> None:
    """FP8 takes no GPTQ settings; static activation scales need calibration data; the evaluation
    needs FP8 GEMMs when it runs on a GPU."""
    from telechat.model.checkpoint import resolve_device
    from telechat.model.fp8 import check_fp8_device

    if args.bits not in (None, 8):
        raise UserError(f"--bits {args.bits} is a GPTQ setting; FP8 weights are 8-bit (drop --bits or use --method gptq)")
    if args.group_size is not None:
        raise UserError("--group-size is a GPTQ setting; FP8 scales are per output channel")
    if args.activations == "static" and args.calib is None:
        raise UserError("--activations static needs --calib (the data its activation scales are measured on)")
    args.bits = 8
    if not args.skip_eval:
        check_fp8_device(resolve_device(args.device))


def _check_group_size(args: argparse.Namespace, config: dict) -> None:
    widths = {k: config[k] for k in ("hidden_size", "ffn_hidden_size") if config.get(k)}
    if args.group_size is None:
        args.group_size = default_group_size(widths)
    elif args.group_size != -1 and args.group_size < 1:
        raise UserError("--group-size must be positive or -1 (per channel)")
    elif args.group_size != -1:
        bad = {k: v for k, v in widths.items() if v % args.group_size}
        if bad:
            raise UserError(f"--group-size {args.group_size} does not divide {bad} (Linear input widths); "
                            "pick a divisor or -1")


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

    from jobs.quant.agreement import NEW_TOKENS, agreement, golden_prompt_ids
    from jobs.quant.calib import load_calibration, load_eval_tokens, load_heldout
    from jobs.quant.report import QuantReport, evaluate, weights_mb
    from telechat.chat_format import ChatFormat
    from telechat.model.checkpoint import resolve_device
    from telechat.tokenizer import load_tokenizer

    _check_args(args)
    device = resolve_device(args.device)
    gen_file = args.model / "generation_config.json"
    generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    chat = ChatFormat(load_tokenizer(args.model), generation)
    calibrates = args.method == "gptq" or args.activations == "static"
    data = (load_calibration(args.calib, chat, args.calib_samples, args.calib_seq_len, seed=args.seed)
            if args.calib and calibrates else None)
    if args.eval_data:
        eval_tokens = load_eval_tokens(args.eval_data, chat)
    elif args.calib:
        eval_tokens = data.heldout if data else load_heldout(args.calib, chat)
    else:
        eval_tokens = []
    eval_tokens = eval_tokens[: args.eval_max_tokens]
    eval_seq_len = min(args.eval_seq_len, max(len(eval_tokens), 2))
    prompts, stops = golden_prompt_ids(chat), chat.stop_token_ids

    report = QuantReport(
        model=str(args.model), output=str(args.output), method=args.method, bits=args.bits, scheme=_scheme(args),
        group_size=args.group_size, desc_act=args.desc_act if args.method == "gptq" else None,
        sym=args.sym if args.method == "gptq" else None,
        activations=args.activations if args.method == "fp8" else None,
        eval_data=str(args.eval_data or f"{args.calib} (held-out tail)") if eval_tokens else None,
        eval_tokens=len(eval_tokens), eval_seq_len=eval_seq_len if eval_tokens else 0,
        size_original_mb=weights_mb(args.model),
    )
    if data is not None:
        report.calib_file, report.calib_samples = str(args.calib), len(data.samples)
        report.calib_tokens = sum(map(len, data.samples))

    def evaluate_model(load, prepare=None):
        return evaluate(load, eval_tokens, eval_seq_len, prompts, stops, prepare=prepare)

    quantize = _quantize_gptq if args.method == "gptq" else _quantize_fp8
    original = quantized = None
    try:
        with staged(args.output.resolve()) as tmp:
            original, quantized = quantize(args, tmp, device, data, evaluate_model, report)
            copy_companions(args.model, tmp)  # the tokenizer GPTQModel would re-save can differ
            report.size_quantized_mb = weights_mb(tmp)
            if original is not None:
                report.ppl_original, report.ppl_quantized = original.ppl, quantized.ppl
                report.greedy_prompts, report.greedy_new_tokens = len(prompts), NEW_TOKENS
                report.greedy_identical, report.greedy_agreement_pct = agreement(original.continuations,
                                                                                 quantized.continuations)
                if report.ppl_change_pct is not None:
                    log.info("perplexity %.3f -> %.3f (%+.2f%%)", report.ppl_original, report.ppl_quantized,
                             report.ppl_change_pct)
                log.info("greedy agreement: %d of %d golden prompts identical, %.1f%% of tokens before the first "
                         "divergence", report.greedy_identical, len(prompts), report.greedy_agreement_pct)
            report.write(tmp)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("wrote %s\n%s", args.output, report.markdown())
    return args.output


def _scheme(args: argparse.Namespace) -> str:
    if args.method == "gptq":
        return f"int{args.bits}, group size {args.group_size}, desc_act {args.desc_act}, sym {args.sym}"
    activations = "dynamic per token" if args.activations == "dynamic" else "static per tensor (calibrated)"
    head = "FP8" if args.quantize_head else "dense"
    return f"FP8 E4M3 weights per output channel, activations {activations}, lm_head {head}"


def _quantize_gptq(args, tmp: Path, device: str, data, evaluate_model, report):
    """GPTQ into ``tmp``; returns the original's and the quantized model's evaluations (None with --skip-eval)."""
    import torch

    from jobs.quant.gptq import quantize, sandbox  # heavy import (GPTQModel); after the cheap checks
    from telechat.model.checkpoint import DTYPES
    from telechat.model.loader import load_model
    from telechat.model.quantized import load_quantized

    original = None if args.skip_eval else evaluate_model(lambda: load_model(args.model, device=device))
    work = owned_temp_dir(Path(tempfile.gettempdir()), "gptq")
    log.info("GPTQ int%d, group size %d, on %s (GPTQModel's own output: %s)", args.bits, args.group_size, device,
             work / "gptqmodel.log")
    try:
        report.quant_seconds = quantize(
            args.model, tmp, data.samples, bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
            sym=args.sym, dtype=DTYPES[args.dtype], device=device, work=work, batch_size=args.batch_size,
        )
        log.info("quantized in %.1f s", report.quant_seconds)
        if args.skip_eval:
            return None, None
        with sandbox(work):  # loading goes through GPTQModel too
            quantized = evaluate_model(lambda: load_quantized(tmp, device=device))
        return original, quantized
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _quantize_fp8(args, tmp: Path, device: str, data, evaluate_model, report):
    """FP8 into ``tmp`` (static activation scales measured on the original, loaded once for them and
    its evaluation); returns both evaluations (None with --skip-eval)."""
    from jobs.quant.fp8 import calibrate_input_scales, quantized_linears, write_fp8_checkpoint
    from telechat.model.checkpoint import DTYPES, inspect_checkpoint
    from telechat.model.fp8 import Fp8Scheme
    from telechat.model.loader import load_model

    scales: dict[str, float] = {}
    static = args.activations == "static"

    def calibrate(model) -> None:
        names = quantized_linears(model, Fp8Scheme.ours("static", args.quantize_head))
        scales.update(calibrate_input_scales(model, data.samples, names))

    def load_original():
        return load_model(args.model, device=device, dtype=args.dtype or "auto")

    original = None
    if not args.skip_eval:
        original = evaluate_model(load_original, prepare=calibrate if static else None)
    elif static:
        model = load_original()
        calibrate(model)
        del model
    log.info("%s → %s", _scheme(args), args.output)
    start = time.perf_counter()
    write_fp8_checkpoint(inspect_checkpoint(args.model), tmp, activations=args.activations,
                         input_scales=scales if static else None,
                         dtype=DTYPES[args.dtype] if args.dtype else None, head=args.quantize_head)
    report.quant_seconds = time.perf_counter() - start
    log.info("quantized in %.1f s", report.quant_seconds)
    if args.skip_eval:
        return None, None
    return original, evaluate_model(lambda: load_model(tmp, device=device, dtype=args.dtype or "auto"))


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
