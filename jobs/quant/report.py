"""Perplexity and greedy agreement before/after quantization, written as ``quant_report.json`` and
``quant_report.md``."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jobs.quant.agreement import greedy_continuations
from telechat.tools.perplexity import perplexity

log = logging.getLogger(__name__)

REPORT_JSON = "quant_report.json"
REPORT_MD = "quant_report.md"


@dataclass
class QuantReport:
    """What one ``telechat quantize`` run produced and what it cost."""

    model: str
    output: str
    method: str
    """``gptq`` or ``fp8``."""
    bits: int
    scheme: str
    """One line: how the weights (and activations) are quantized."""
    quant_seconds: float = 0.0
    group_size: int | None = None
    desc_act: bool | None = None
    sym: bool | None = None
    activations: str | None = None
    """FP8 only: ``dynamic`` (per token) or ``static`` (calibrated per tensor)."""
    calib_file: str | None = None
    calib_samples: int = 0
    calib_tokens: int = 0
    eval_data: str | None = None
    eval_tokens: int = 0
    eval_seq_len: int = 0
    ppl_original: float | None = None
    ppl_quantized: float | None = None
    size_original_mb: float = 0.0
    size_quantized_mb: float = 0.0
    greedy_prompts: int = 0
    greedy_new_tokens: int = 0
    greedy_identical: int | None = None
    """Golden prompts whose greedy continuation is identical to the original's."""
    greedy_agreement_pct: float | None = None
    """Share of the original's greedy tokens the quantized model reproduces before its first divergence."""

    @property
    def label(self) -> str:
        """The quantized model's name in tables: ``GPTQ int4``, ``FP8 (dynamic)``."""
        return f"GPTQ int{self.bits}" if self.method == "gptq" else f"FP8 ({self.activations})"

    @property
    def ppl_change_pct(self) -> float | None:
        """Relative perplexity rise of the quantized model, in percent."""
        if self.ppl_original is None or self.ppl_quantized is None:
            return None
        return 100.0 * (self.ppl_quantized / self.ppl_original - 1.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_change_pct": self.ppl_change_pct}

    def markdown(self) -> str:
        """Tables a person can paste into RESULTS.md or an issue."""
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        change = self.ppl_change_pct
        calib = (f"{self.calib_samples} calibration samples ({self.calib_tokens} tokens) from `{self.calib_file}`"
                 if self.calib_samples else "no calibration data")
        title = f"GPTQ int{self.bits}" if self.method == "gptq" else "FP8"
        lines = [
            f"# {title} report", "",
            f"Model `{self.model}` → `{self.output}`; {self.scheme}; {calib}; quantized in {self.quant_seconds:.1f} s.",
            "",
        ]
        if self.eval_tokens:
            lines.append(f"Perplexity on `{self.eval_data}` ({self.eval_tokens} tokens, windows of {self.eval_seq_len}):")
        else:
            lines.append("Perplexity: not measured (no evaluation data: pass --eval-data or --calib).")
        lines += [
            "",
            "| model | perplexity | change | size (MB) |",
            "|---|---|---|---|",
            f"| original | {fmt(self.ppl_original)} | | {self.size_original_mb:.1f} |",
            f"| {self.label} | {fmt(self.ppl_quantized)} | "
            f"{'n/a' if change is None else f'{change:+.2f}%'} | {self.size_quantized_mb:.1f} |",
        ]
        if self.greedy_identical is not None:
            lines += [
                "",
                f"Greedy decoding of the {self.greedy_prompts} golden prompts (up to {self.greedy_new_tokens} new "
                "tokens each), against the original:",
                "",
                "| model | identical continuations | tokens before the first divergence |",
                "|---|---|---|",
                f"| {self.label} | {self.greedy_identical} / {self.greedy_prompts} | {self.greedy_agreement_pct:.1f}% |",
            ]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> None:
        (folder / REPORT_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        (folder / REPORT_MD).write_text(self.markdown(), encoding="utf-8")


@dataclass(frozen=True)
class Evaluation:
    """One model's perplexity (None without evaluation tokens) and greedy continuations of the golden prompts."""

    ppl: float | None
    continuations: list[list[int]]


def evaluate(load: Callable, tokens: list[int], seq_len: int, prompts: list[list[int]], stop_ids: list[int],
             prepare: Callable | None = None) -> Evaluation:
    """Perplexity and greedy continuations of the model returned by ``load()``; ``prepare(model)``, if
    given, runs first (static FP8 calibration uses the loaded original). The model is freed before returning."""
    model = load()
    try:
        if prepare is not None:
            prepare(model)
        ppl = perplexity(model, tokens, seq_len) if tokens else None
        return Evaluation(ppl, greedy_continuations(model, prompts, stop_ids))
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def weights_mb(folder: Path) -> float:
    """Size of the weight files in a checkpoint folder."""
    suffixes = (".safetensors", ".bin", ".pt")
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in suffixes) / 2**20
