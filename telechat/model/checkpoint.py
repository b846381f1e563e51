"""Checkpoint discovery and validation with errors a person can act on (loading: :mod:`telechat.model.loader`).

Official layouts (docs/model.md, checkpoint layouts) and how they map onto our parameter names (= official 12B names):

| checkpoint key (7B release)            | model parameter                                   |
|----------------------------------------|---------------------------------------------------|
| ``h.{i}.<rest>``                        | ``transformer.h.{i}.<rest>``                      |
| ``word_embeddings.weight``              | ``transformer.word_embeddings.weight``            |
| ``ln_f.weight``                         | ``transformer.ln_f.weight``                       |
| (no ``lm_head.weight``: tied)           | ``lm_head.weight`` = word embeddings              |

12B/12B-V2 and TeleChat2 keys already carry the ``transformer.`` prefix and an ``lm_head``;
transformers' ``base_model_prefix`` logic adds the prefix for the 7B layout. Fused ``key_value``
stays fused (per-head interleaved K/V rows), so no tensor is rewritten on load or save.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from telechat.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(UserError, ValueError):
    """A checkpoint folder cannot be used; the message names the file and the fix."""


PREFIX = "transformer."
"""Prefix of the decoder's tensors in the 12B layout (and of our parameter names)."""
_UNPREFIXED_ROOTS = ("h.", "word_embeddings.", "word_embeddings_layernorm.", "ln_f.")
"""First component of the 7B layout's keys, which lack :data:`PREFIX`."""


def canonical_key(key: str) -> str:
    """A checkpoint key in our (= official 12B) naming: the 7B layout's ``h.0.…`` becomes ``transformer.h.0.…``."""
    return PREFIX + key if key.startswith(_UNPREFIXED_ROOTS) else key


def split_key_value(weight: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows of a fused ``key_value`` weight ``[2·n_kv·d, H]``, each ``[n_kv·d, H]``, heads in order.

    The official rows are interleaved per head: ``[2d·h, 2d·h+d)`` is K of head h, the next ``d`` its V.
    """
    if weight.shape[0] != 2 * num_kv_heads * head_dim:
        raise CheckpointError(f"key_value weight has {weight.shape[0]} rows; expected 2·{num_kv_heads}·{head_dim}")
    per_head = weight.view(num_kv_heads, 2, head_dim, *weight.shape[1:])
    rows = (num_kv_heads * head_dim, *weight.shape[1:])
    return per_head[:, 0].reshape(rows), per_head[:, 1].reshape(rows)


DEMO_MODEL_NAME = "telechat-demo"
"""Model id of the built-in demo model on every backend."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a valid checkpoint folder holds."""

    path: Path
    config: dict
    weight_files: tuple[Path, ...]
    quantized: bool
    is_demo: bool
    generation: dict | None = None
    """``generation_config.json`` as read with the config (None when the folder has none)."""
    quant_method: str | None = None
    """``quant_method`` of a quantized checkpoint: ``gptq`` (also the official releases, which have only
    ``quantize_config.json``) or ``compressed-tensors`` (FP8, :mod:`telechat.model.fp8`); None when dense."""

    def served_name(self, override: str | None = None) -> str:
        """The model id clients use: ``override``, else :data:`DEMO_MODEL_NAME` for the demo model,
        else the folder name. Every backend (our API, the vLLM launcher) names a model so."""
        return override or (DEMO_MODEL_NAME if self.is_demo else self.path.resolve().name)


def inspect_checkpoint(path: str | Path, *, need_tokenizer: bool = False) -> CheckpointInfo:
    """Validate a checkpoint folder without loading tensors; raise :class:`CheckpointError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist; pass --model with a TeleChat checkpoint folder "
                              "(or run `telechat demo-model DIR` to create a demo one)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; --model expects the checkpoint folder that holds config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing; a TeleChat checkpoint folder needs its config.json")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); restore it from the original release") from e
    archs = config.get("architectures") or []
    from telechat.model.config import ARCHITECTURES

    if config.get("model_type") not in ("telechat", "telechat2") or any(a not in ARCHITECTURES for a in archs):
        raise CheckpointError(
            f"{cfg_file} declares model_type={config.get('model_type')!r}, architectures={archs}; "
            f"this runtime loads TeleChat checkpoints ({', '.join(ARCHITECTURES)})")
    quant_method = _quant_method(config, path)
    quantized = quant_method is not None
    files = _weight_files(path, quantized)
    if need_tokenizer and not any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise CheckpointError(f"{path} has no tokenizer.model or tokenizer.json; copy the tokenizer files of the "
                              "release into the folder")
    return CheckpointInfo(path, config, files, quantized, bool(config.get("telechat_demo")),
                          _read_generation(path / "generation_config.json"), quant_method)


def _quant_method(config: dict, path: Path) -> str | None:
    """The checkpoint's ``quant_method`` (lower case; ``gptq`` when unnamed), None for a dense checkpoint."""
    qcfg = config.get("quantization_config")
    if qcfg is not None:
        return str(qcfg.get("quant_method", "gptq")).lower() if isinstance(qcfg, dict) else "gptq"
    return "gptq" if (path / "quantize_config.json").is_file() else None


def _read_generation(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from e


def _weight_files(path: Path, quantized: bool) -> tuple[Path, ...]:
    for name in INDEX_FILES:
        index = path / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is corrupt ({e}); restore it from the original release") from e
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path / missing[0]} is missing ({len(missing)} of {len(shards)} shards listed "
                                      f"in {name}); finish downloading the checkpoint")
            return tuple(path / s for s in shards)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return (path / name,)
    if quantized:
        gptq = sorted(p for p in path.iterdir() if p.name.startswith("gptq_model-") or p.suffix == ".safetensors")
        if gptq:
            return tuple(gptq)
    raise CheckpointError(f"{path} holds no weights (expected {' or '.join(WEIGHT_FILES)} or a sharded "
                          f"{' / '.join(INDEX_FILES)})")


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` → bf16 on CUDA with bf16 support, else fp16 on CUDA, fp32 on CPU; validates support."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        if device.startswith("cuda"):
            resolved = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            resolved = torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise CheckpointError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    if device.startswith("cuda") and resolved == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CheckpointError("this GPU has no bfloat16 support; pass --dtype float16")
    return resolved


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; rejects CUDA requests without a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but no CUDA GPU is visible; use --device cpu")
    return device


def iter_tensors(file: Path):
    """``(key, tensor)`` of one weight file, one tensor at a time (safetensors) or memory-mapped (``.bin``)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()


def first_line(e: BaseException) -> str:
    """An exception's first line (at most 300 characters), or its type name when it has no message."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
