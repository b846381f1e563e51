"""Command line + YAML → :class:`FinetuneArguments`, with every cross-field check in one place.

Precedence: explicit flags > ``--config`` YAML > (with ``--resume``) the run's ``run_config.yaml``
> dataclass defaults. Errors raise :class:`ArgsError` whose message says what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from jobs.finetune.hparams import GROUPS, FinetuneArguments
from jobs.finetune.run_config import RUN_CONFIG, changed_options
from jobs.output import is_nonempty_dir
from telechat.model.checkpoint import inspect_checkpoint
from telechat.model.config import PRESETS
from telechat.errors import UserError

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_LR = {"lora": 2e-4, "full": 3e-5}


class ArgsError(UserError, ValueError):
    """Settings that cannot work together; the message names the options and the fix."""


def _base_type(hint: Any) -> type:
    """``int | None`` → ``int``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _fields():
    """(group, field, option type) for every option, in ``--help`` order."""
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield group, f, _base_type(hints[f.name])


def build_parser(prog: str = "telechat finetune") -> argparse.ArgumentParser:
    """The argparse parser; options default to SUPPRESS so we can tell what was passed explicitly."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune TeleChat (LoRA or full SFT) on chat data; see jobs/finetune/README "
        "or `--help` of each option. Flags override --config YAML values.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of option values (keys as in the flags, - or _).")
    # The deepspeed launcher appends --local_rank=N; torchrun passes LOCAL_RANK in the environment.
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    sections = {g: parser.add_argument_group(f"{g} options", cls.__doc__) for g, cls in GROUPS.items()}
    for group, f, typ in _fields():
        meta = dict(f.metadata)
        help_text = meta.pop("help") + ("" if f.default is None else f" (default: {f.default})")
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            sections[group].add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            meta.setdefault("metavar", None if "choices" in meta else f.name.upper())
            sections[group].add_argument(flag, type=typ, help=help_text, **meta)
    return parser


def _load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ArgsError(f"--config {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ArgsError(f"--config {file} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ArgsError(f"--config {file} must hold a mapping of option: value")
    known = {f.name: typ for _, f, typ in _fields()}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ArgsError(f"--config {file}: unknown option {key!r}; see `telechat finetune --help`")
        typ = known[name]
        if value is not None and typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and typ is float and isinstance(value, str):
            value = float(value)  # PyYAML reads 2e-4 (no dot) as a string
        if value is not None and not isinstance(value, typ):
            raise ArgsError(f"--config {file}: {key} must be {typ.__name__}, got {value!r}")
        values[name] = value
    return values


def parse_args(argv: Sequence[str] | None = None) -> FinetuneArguments:
    """Parse flags (+ optional YAML, + the resumed run's ``run_config.yaml``), fill cross-field
    defaults and validate."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    values = _load_yaml(ns.pop("config")) if "config" in ns else {}
    ns.pop("local_rank", None)
    values.update(ns)
    saved = _resumed_run_config(values)
    merged = {**saved, **values}
    groups = {g: {} for g in GROUPS}
    for group, f, _ in _fields():
        if f.name in merged:
            groups[group][f.name] = merged[f.name]
    args = FinetuneArguments(**{g: GROUPS[g](**kw) for g, kw in groups.items()})
    check_args(args)
    changed = changed_options(saved, args)
    if changed:
        raise ArgsError(f"a resumed run keeps the options that shape its model and data: {'; '.join(changed)}; "
                        "drop them, or start a new run with another --output")
    return args


def _resumed_run_config(values: dict[str, Any]) -> dict[str, Any]:
    """The options in ``OUTPUT/run_config.yaml`` when resuming (empty for a run that has none)."""
    if values.get("resume") is None or values.get("output") is None:
        return {}
    file = Path(values["output"]) / RUN_CONFIG
    return _load_yaml(str(file)) if file.is_file() else {}


def check_args(args: FinetuneArguments) -> None:
    """All cross-field rules; fills the defaults that depend on other fields (lr, eval steps, resume)."""
    m, d, lo, t = args.model, args.data, args.lora, args.train
    if t.output is None:
        raise ArgsError("--output is required: the folder for checkpoints, logs and the final model")
    if d.data is None:
        raise ArgsError("--data is required: a jsonl file or a data.json of weighted jsonl files")
    if not Path(d.data).is_file():
        raise ArgsError(f"--data {d.data} does not exist")
    if (m.model is None) == (m.from_scratch is None):
        raise ArgsError("pass exactly one of --model (fine-tune a checkpoint) and --from-scratch (random init)")
    _check_sources(args)
    if m.from_scratch is not None:
        if t.method != "full":
            raise ArgsError("--from-scratch trains every weight: use --method full")
        if m.tokenizer is None:
            raise ArgsError("--from-scratch needs --tokenizer FOLDER (a random model has none)")
        if m.from_scratch not in PRESETS and not Path(m.from_scratch).is_file():
            raise ArgsError(f"--from-scratch {m.from_scratch!r} is neither a preset ({', '.join(PRESETS)}) "
                            "nor an existing config.json")
    else:
        sized = [n for n in ("hidden_size", "layers", "heads", "ffn", "vocab_size") if getattr(m, n) is not None]
        if sized:
            raise ArgsError(f"--{sized[0].replace('_', '-')} resizes a random init: it needs --from-scratch")
    if d.max_seq_len < 16:
        raise ArgsError("--max-seq-len must be at least 16")
    if not 0.0 <= d.eval_split < 1.0:
        raise ArgsError("--eval-split is a fraction in [0, 1)")
    if t.eval_steps is not None and d.eval_split == 0:
        raise ArgsError("--eval-steps needs held-out data: set --eval-split (e.g. 0.05)")
    if t.method == "lora":
        if lo.lora_rank < 1 or lo.lora_alpha <= 0 or not 0 <= lo.lora_dropout < 1:
            raise ArgsError("LoRA needs --lora-rank >= 1, --lora-alpha > 0 and 0 <= --lora-dropout < 1")
        if not args.lora_targets:
            raise ArgsError("--lora-targets is empty; e.g. query,key_value,dense")
    for name in ("batch_size", "grad_accum", "save_steps", "logging_steps", "save_total_limit"):
        if getattr(t, name) < 1:
            raise ArgsError(f"--{name.replace('_', '-')} must be >= 1")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ArgsError("set --epochs > 0 or --max-steps > 0")
    if t.warmup < 0:
        raise ArgsError("--warmup must be >= 0 (a fraction < 1 or a step count)")
    if t.loss_chunk_tokens < 0:
        raise ArgsError("--loss-chunk-tokens must be >= 0 (0 = off)")
    _check_parallelism(t)
    _check_device(t)
    if t.lr is None:
        t.lr = DEFAULT_LR[t.method]
    if t.lr <= 0:
        raise ArgsError("--lr must be > 0")
    if d.eval_split > 0 and t.eval_steps is None:
        t.eval_steps = t.save_steps
    _check_output(t)


def _check_sources(args: FinetuneArguments) -> None:
    """The model and tokenizer folders are usable; paths become absolute (they are recorded in
    adapter_config.json and run_config.yaml, which must work from any directory)."""
    m, d, t = args.model, args.data, args.train
    if m.model is not None:
        info = inspect_checkpoint(m.model, need_tokenizer=m.tokenizer is None)
        if info.quantized:
            raise ArgsError(f"{m.model} is a quantized (GPTQ) checkpoint, which cannot be fine-tuned here: fine-tune "
                            "the bf16/fp16 checkpoint it came from, then quantize the result with `telechat quantize`")
        m.model = str(info.path.resolve())
    if m.tokenizer is not None:
        tok = Path(m.tokenizer)
        if not any((tok / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
            raise ArgsError(f"--tokenizer {tok} holds no tokenizer.model or tokenizer.json; pass a TeleChat "
                            "checkpoint or tokenizer folder")
        m.tokenizer = str(tok.resolve())
    if m.from_scratch is not None and Path(m.from_scratch).is_file():
        m.from_scratch = str(Path(m.from_scratch).resolve())
    d.data = str(Path(d.data).resolve())
    if t.deepspeed_config is not None and Path(t.deepspeed_config).is_file():
        t.deepspeed_config = str(Path(t.deepspeed_config).resolve())


def _check_parallelism(t) -> None:
    if t.backend == "fsdp":
        if t.method != "full":
            raise ArgsError("--backend fsdp shards full SFT; LoRA trains a small adapter: drop --backend fsdp "
                            "(one GPU, or plain data parallel under torchrun)")
        if not _cuda():
            raise ArgsError("--backend fsdp needs GPUs (accelerate runs FSDP on accelerators only, not on CPU "
                            "processes): on CPU use --backend deepspeed")
        if t.zero or t.deepspeed_config or t.offload:
            raise ArgsError("--zero/--deepspeed-config/--offload are DeepSpeed options: drop them with --backend fsdp, "
                            "or use --backend deepspeed")
    if t.offload and t.zero == 0 and t.deepspeed_config is None:
        raise ArgsError("--offload is a DeepSpeed ZeRO feature: add --zero 2 or --zero 3")
    if t.deepspeed_config is not None and not Path(t.deepspeed_config).is_file():
        raise ArgsError(f"--deepspeed-config {t.deepspeed_config} does not exist")
    if (t.zero or t.deepspeed_config) and importlib.util.find_spec("deepspeed") is None:
        raise ArgsError("--zero/--deepspeed-config need DeepSpeed: pip install 'telechat-stack[train]' "
                        "(or run with --zero 0)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_device(t) -> None:
    """Settle ``--precision auto`` and ``--compile auto`` for the GPUs (or CPU) this process sees."""
    import torch

    cuda = _cuda()
    # One process seeing several GPUs: the Trainer replicates the model with nn.DataParallel, whose
    # replicas cannot run blocks compiled for the first GPU.
    data_parallel = (cuda and torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ
                     and not (t.zero or t.deepspeed_config) and t.backend != "fsdp")
    if t.compile == "auto":
        t.compile = "on" if cuda and not data_parallel else "off"
    if t.compile == "on" and data_parallel:
        raise ArgsError(f"--compile on cannot run in one process over {torch.cuda.device_count()} GPUs (the Trainer's "
                        "DataParallel): launch with torchrun --nproc_per_node N, or make one GPU visible "
                        "(CUDA_VISIBLE_DEVICES=0)")
    if t.precision == "auto":
        t.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if t.precision == "fp16" and not cuda:
        raise ArgsError("--precision fp16 needs a GPU (mixed-precision loss scaling); use fp32 or bf16 on CPU")
    if t.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ArgsError("this GPU has no bf16: use --precision fp16")


def _check_output(t) -> None:
    out = Path(t.output)
    if out.exists() and not out.is_dir():
        raise ArgsError(f"--output {out} is a file; pass a folder")
    if t.resume is not None:
        if t.overwrite:
            raise ArgsError("--resume continues a run and --overwrite starts a new one: pick one")
        if t.resume == "last":
            last = last_checkpoint(out)
            if last is None:
                raise ArgsError(f"--resume: no complete checkpoint-N in {out}; drop --resume to start fresh")
            t.resume = str(last)
        elif not (Path(t.resume) / "trainer_state.json").is_file():
            raise ArgsError(f"--resume {t.resume} is not a complete checkpoint (no trainer_state.json)")
    elif not t.overwrite and is_nonempty_dir(out):
        raise ArgsError(f"--output {out} is not empty: pass --resume to continue the run in it, --overwrite to start "
                        "a new run there (its checkpoint-N are removed, other files kept), or choose another --output")


def last_checkpoint(output: Path, complete_only: bool = True) -> Path | None:
    """Newest ``checkpoint-N`` in ``output``; with ``complete_only``, one whose trainer state was written.

    The Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a folder
    without a readable one; resuming skips it and takes the previous checkpoint.
    """
    if not output.is_dir():
        return None
    found = sorted(((int(mt.group(1)), p) for p in output.iterdir()
                    if p.is_dir() and (mt := CHECKPOINT_DIR.match(p.name))), reverse=True)
    for _, path in found:
        if not complete_only or _state_readable(path / "trainer_state.json"):
            return path
    return None


def _state_readable(file: Path) -> bool:
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True
