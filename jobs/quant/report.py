"""Perplexity before/after quantization, written as ``quant_report.json`` and ``quant_report.md``."""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from telechat.tools.perplexity import perplexity

log = logging.getLogger(__name__)

REPORT_JSON = "quant_report.json"
REPORT_MD = "quant_report.md"


@dataclass
class QuantReport:
    """What one ``telechat quantize`` run produced and what it cost."""

    model: str
    output: str
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    calib_file: str
    calib_samples: int
    calib_tokens: int
    quant_seconds: float
    eval_data: str | None = None
    eval_tokens: int = 0
    eval_seq_len: int = 0
    ppl_original: float | None = None
    ppl_quantized: float | None = None
    size_original_mb: float = 0.0
    size_quantized_mb: float = 0.0

    @property
    def ppl_change_pct(self) -> float | None:
        """Relative perplexity rise of the quantized model, in percent."""
        if self.ppl_original is None or self.ppl_quantized is None:
            return None
        return 100.0 * (self.ppl_quantized / self.ppl_original - 1.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_change_pct": self.ppl_change_pct}

    def markdown(self) -> str:
        """A table a person can paste into RESULTS.md or an issue."""
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        change = self.ppl_change_pct
        lines = [
            f"# GPTQ int{self.bits} report", "",
            f"Model `{self.model}` → `{self.output}`; group size {self.group_size}, desc_act {self.desc_act}, "
            f"sym {self.sym}; {self.calib_samples} calibration samples ({self.calib_tokens} tokens) from "
            f"`{self.calib_file}`; quantized in {self.quant_seconds:.1f} s.", "",
            f"Perplexity on `{self.eval_data}` ({self.eval_tokens} tokens, windows of {self.eval_seq_len}):", "",
            "| model | perplexity | change | size (MB) |",
            "|---|---|---|---|",
            f"| original | {fmt(self.ppl_original)} | | {self.size_original_mb:.1f} |",
            f"| GPTQ int{self.bits} | {fmt(self.ppl_quantized)} | "
            f"{'n/a' if change is None else f'{change:+.2f}%'} | {self.size_quantized_mb:.1f} |",
        ]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> None:
        (folder / REPORT_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        (folder / REPORT_MD).write_text(self.markdown(), encoding="utf-8")


def evaluate(load, tokens: list[int], seq_len: int) -> float:
    """Perplexity of the model returned by ``load()``; the model is freed before returning."""
    model = load()
    try:
        return perplexity(model, tokens, seq_len)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def weights_mb(folder: Path) -> float:
    """Size of the weight files in a checkpoint folder."""
    suffixes = (".safetensors", ".bin", ".pt")
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in suffixes) / 2**20
