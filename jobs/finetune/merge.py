"""``telechat merge-lora``: fold a LoRA adapter into its base model and write a full checkpoint.

The result uses the official TeleChat parameter names, carries the base's tokenizer files,
generation_config.json and remote-code files, and is written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import torch

from jobs.finetune.export import copy_companions, publish, temp_dir
from telechat.checkpoint import DTYPES, CheckpointError, load_model

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def adapter_base(adapter: Path) -> Path:
    """The base model folder recorded in ``adapter_config.json``."""
    file = adapter / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{file} names no base model; pass --base")
    return Path(base)


def merge_lora(base: str | Path, adapter: str | Path, output: str | Path, dtype: str = "auto",
               device: str = "cpu") -> Path:
    """Write ``base`` + ``adapter`` merged into ``output``; returns ``output``.

    ``dtype`` ``auto`` keeps the base checkpoint's dtype. The merge runs in float32 and is cast
    once at the end, so a bf16 base loses no precision to the update itself.
    """
    from peft import PeftModel

    base, adapter, output = Path(base), Path(adapter), Path(output)
    target = _target_dtype(base, dtype)
    model = load_model(base, device=device, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(target)
    tmp = temp_dir(output)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    copy_companions(base, tmp)
    log.info("merged %s into %s -> %s (%s)", adapter, base, output, str(target).removeprefix("torch."))
    return publish(tmp, output)


def _target_dtype(base: Path, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)


def build_parser(prog: str = "telechat merge-lora") -> argparse.ArgumentParser:
    """Options of ``telechat merge-lora``."""
    p = argparse.ArgumentParser(prog=prog, description="Merge a LoRA adapter into its base TeleChat checkpoint.")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (adapter_config.json + weights).")
    p.add_argument("--base", help="Base checkpoint folder (default: the one named in adapter_config.json).")
    p.add_argument("--output", required=True, help="Folder for the merged checkpoint (written atomically).")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="Dtype of the saved weights (default: auto = the base checkpoint's).")
    p.add_argument("--device", default="cpu", help="Device to merge on, e.g. cuda for a 7B base (default: cpu).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``telechat merge-lora``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        adapter = Path(args.adapter)
        base = Path(args.base) if args.base else adapter_base(adapter)
        out = merge_lora(base, adapter, args.output, args.dtype, args.device)
    except (CheckpointError, OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("merged checkpoint written to %s", out)
    return 0
