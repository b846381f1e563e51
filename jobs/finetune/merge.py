"""``telechat merge-lora``: fold a LoRA adapter into its base model and write a full checkpoint.

The result uses the official TeleChat parameter names, carries the base's tokenizer files,
generation_config.json and remote-code files, and is written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from jobs.finetune.export import export_checkpoint
from jobs.output import check_output
from jobs.quiet import import_gptqmodel_quietly, setup_logging
from telechat.model.checkpoint import DTYPES, CheckpointError, first_line
from telechat.model.loader import load_model
from telechat.errors import UserError

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


BASE_RECORD = "telechat_base.json"
"""Beside ``adapter_config.json``: the base folder relative to the adapter, so the adapter finds its
base wherever the pair is mounted (``./models`` on the host, ``/models`` in the containers)."""


def record_base(folder: Path, base: Path, final: Path) -> None:
    """Write :data:`BASE_RECORD` into ``folder`` (the staged adapter that becomes ``final``)."""
    relative = os.path.relpath(base.resolve(), final.resolve())
    (folder / BASE_RECORD).write_text(json.dumps({"relative_to_adapter": relative}) + "\n", encoding="utf-8")


def adapter_base(adapter: Path) -> Path:
    """The base model folder of an adapter: the absolute path in ``adapter_config.json``, else the
    path relative to the adapter in :data:`BASE_RECORD`; one line naming ``--base`` when neither is here."""
    file = adapter / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    candidates = [Path(base)] if base else []
    record = adapter / BASE_RECORD
    if record.is_file():
        candidates.append(adapter / json.loads(record.read_text(encoding="utf-8"))["relative_to_adapter"])
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    if not candidates:
        raise CheckpointError(f"{file} names no base model; pass --base FOLDER")
    raise CheckpointError(f"the base model {base} named in {file} is not found here; "
                          "pass --base FOLDER (the checkpoint the adapter was trained on)")


def merge_lora(base: str | Path, adapter: str | Path, output: str | Path, dtype: str = "auto",
               device: str = "cpu") -> Path:
    """Write ``base`` + ``adapter`` merged into ``output`` (:func:`export_checkpoint`); returns ``output``.

    ``dtype`` ``auto`` keeps the base checkpoint's dtype. The merge runs in float32 and is cast
    once at the end, so a bf16 base loses no precision to the update itself.
    """
    from peft import PeftModel

    import_gptqmodel_quietly()  # PEFT imports it to look for quantized layers
    base, adapter, output = Path(base), Path(adapter), Path(output)
    target = _target_dtype(base, dtype)
    model = load_model(base, device=device, dtype=torch.float32)
    try:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot apply the adapter {adapter} to {base}: {first_line(e)}") from e
    log.info("merged %s into %s", adapter, base)
    return export_checkpoint(model.state_dict(), model.config, output, dtype=target, companions=[base])


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
    p.add_argument("--output", required=True, type=Path,
                   help="Folder for the merged checkpoint (written atomically; must be new or empty).")
    p.add_argument("--overwrite", action="store_true",
                   help="Write into an existing --output: replace the files the merge writes, keep every other file.")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="Dtype of the saved weights (default: auto = the base checkpoint's).")
    p.add_argument("--device", default="cpu", help="Device to merge on, e.g. cuda for a 7B base (default: cpu).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``telechat merge-lora``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        check_output(args.output, args.overwrite)
        adapter = Path(args.adapter)
        base = Path(args.base) if args.base else adapter_base(adapter)
        out = merge_lora(base, adapter, args.output, args.dtype, args.device)
    except UserError as e:
        log.error("%s", e)
        return 2
    log.info("merged checkpoint written to %s", out)
    return 0
