"""LoRA adapters served per request (docs/engine.md, Batched LoRA): many adapters and the base model
in one forward pass, S-LoRA / punica style.

Every served projection (``qkv``, ``dense``, ``gate_up``, ``down_proj`` after
:meth:`~telechat.model.modeling.TelechatForCausalLM.fuse_projections`) gets two device buffers with
``max_loras`` *slots* stacked along the rank: ``lora_a [S·p·r, in]`` and ``lora_b [out, S·p·r]``
(``r`` = ``max_lora_rank``, ``p`` = the PEFT modules fused into the projection: 2 for ``qkv`` and
``gate_up``, else 1; ``lora_alpha / r`` folded into B). Each token row carries its request's slot
(-1: the base model). One forward computes

    y = x W^T + ((x A^T) * mask) B^T          mask[t, j] = 1 where column j belongs to slot[t]

two GEMMs over every slot at once, static shapes and no host sync, so a CUDA graph captures it and
replays it for any mix of slots (the slot ids are read from a fixed-address buffer). A row of slot
-1 gets exactly ``x W^T``. The fused layouts: ``qkv`` is ``query`` rows then K and V rows, which come
from the per-head interleaved ``key_value`` B the way :func:`~telechat.model.checkpoint.split_key_value`
splits its weight; ``gate_up`` is ``gate_proj`` rows then ``up_proj`` rows, each PEFT module with
its own A (block-diagonal B).

:func:`read_adapter` reads a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``,
as ``telechat finetune --method lora`` writes it) into host tensors already laid out for a slot;
:class:`LoraSlots` owns the device buffers and copies an adapter into a slot.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from telechat.errors import UserError
from telechat.model.checkpoint import split_key_value
from telechat.model.kernels import linear, triton
from telechat.model.lora_kernels import MAX_ROWS, lora_rows

LORA_TARGETS = ("query", "key_value", "dense", "gate_proj", "up_proj", "down_proj")
"""The PEFT module names of a TeleChat layer an adapter may target."""

_KEY = re.compile(r"(?:^|\.)h\.(\d+)\.(?:self_attention|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(UserError, ValueError):
    """A folder that is not a LoRA adapter this model can serve; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------- layout

@dataclass
class _Part:
    """One PEFT module inside a served projection: its B ``[out_t, r]`` placed into the projection's rows."""

    target: str
    place: Callable[[torch.Tensor], torch.Tensor]
    """``B [out_t, r]`` → ``[out, r]``, zero outside the module's rows."""


def _rows(before: int, after: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Zero rows above and below ``B``."""
    def place(b: torch.Tensor) -> torch.Tensor:
        return torch.cat([b.new_zeros(before, b.shape[1]), b, b.new_zeros(after, b.shape[1])])
    return place


def served_projections(model) -> dict[tuple[int, str], tuple[nn.Module, list[_Part]]]:
    """``(layer, projection name) -> (module, parts)`` of every projection a LoRA can reach, in the
    layout the model serves (fused or not)."""
    c = model.config
    nq, nkv = c.n_head * c.head_dim, c.num_key_value_heads * c.head_dim
    out = {}
    for i, block in enumerate(model.transformer.h):
        att, mlp = block.self_attention, block.mlp
        if att.qkv is not None:
            def kv(b: torch.Tensor) -> torch.Tensor:
                k, v = split_key_value(b, c.num_key_value_heads, c.head_dim)
                return torch.cat([b.new_zeros(nq, b.shape[1]), k, v])
            out[i, "qkv"] = (att.qkv, [_Part("query", _rows(0, 2 * nkv)), _Part("key_value", kv)])
        else:
            out[i, "query"] = (att.query, [_Part("query", _rows(0, 0))])
            out[i, "key_value"] = (att.key_value, [_Part("key_value", _rows(0, 0))])
        out[i, "dense"] = (att.dense, [_Part("dense", _rows(0, 0))])
        if mlp.gate_up is not None:
            f = c.ffn_hidden_size
            out[i, "gate_up"] = (mlp.gate_up, [_Part("gate_proj", _rows(0, f)), _Part("up_proj", _rows(f, 0))])
        else:
            out[i, "gate_proj"] = (mlp.gate_proj, [_Part("gate_proj", _rows(0, 0))])
            out[i, "up_proj"] = (mlp.up_proj, [_Part("up_proj", _rows(0, 0))])
        out[i, "down_proj"] = (mlp.down_proj, [_Part("down_proj", _rows(0, 0))])
    return out


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a projection (a plain Linear or a quantized one)."""
    return module.in_features, module.out_features


# ---------------------------------------------------------------------------------------------- adapters

@dataclass(eq=False)
class LoraAdapter:
    """A PEFT adapter read for serving: per served projection, host tensors shaped for one slot."""

    name: str
    path: str
    rank: int
    """The largest rank of its modules."""
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    """``(layer, projection) -> (A [p·r_max, in], B [out, p·r_max])``, scale folded into B; projections
    the adapter does not touch are absent."""
    id: int = 0
    """Unique per load in an engine (an adapter unloaded and loaded again is another id): the prefix-cache
    salt and the slot table key."""


def _config(folder: Path) -> dict:
    """``adapter_config.json`` checked for what serving supports."""
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{folder}/adapter_config.json cannot be read: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise AdapterError(f"{folder}/adapter_config.json is not a LoRA adapter config (no positive integer 'r')")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder} is a {cfg['peft_type']} adapter; only LoRA adapters can be served")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(f"{folder}: LoRA options {', '.join(unsupported)} are not supported for serving "
                           "per request; merge the adapter (telechat finetune export) or serve it with --lora")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        lacking = sorted(set(targets) - set(LORA_TARGETS))
        if lacking:
            raise AdapterError(f"{folder} targets modules this model lacks: {', '.join(lacking)} (TeleChat layers "
                               f"have {', '.join(LORA_TARGETS)})")
    return cfg


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors by PEFT key (safetensors, or the older adapter_model.bin)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if file.is_file():
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{file} cannot be read: {e}") from None
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise AdapterError(f"{folder} has no adapter_model.safetensors")


def read_adapter(folder: str | Path, name: str, model, max_rank: int,
                 dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read the PEFT LoRA adapter in ``folder`` for ``model`` (its served layout), ranks padded to
    ``max_rank``, tensors in ``dtype`` (scales applied in float32 first). Raises :class:`AdapterError`
    for a missing folder, a folder that is no LoRA adapter, a rank above ``max_rank``, or modules,
    layers or shapes the model does not have."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"the adapter folder {folder} does not exist")
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{folder} has no adapter_config.json; pass a LoRA adapter folder (PEFT format, as "
                           "`telechat finetune --method lora` writes it)")
    cfg = _config(folder)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in _tensors(folder).items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"{folder}: tensor {key!r} is not a LoRA weight of a TeleChat layer's "
                               f"{', '.join(LORA_TARGETS)}")
        layer, target, ab = int(m[1]), m[2], m[3]
        if target not in LORA_TARGETS:
            raise AdapterError(f"{folder} targets module {target!r}, which this model lacks (TeleChat layers have "
                               f"{', '.join(LORA_TARGETS)})")
        if layer >= model.config.n_layer:
            raise AdapterError(f"{folder} has weights for layer {layer}; this model has {model.config.n_layer}")
        pairs.setdefault((layer, target), {})[ab] = t
    if not pairs:
        raise AdapterError(f"{folder} holds no LoRA weights")
    rank = 0
    for (layer, target), ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise AdapterError(f"{folder}: layer {layer} {target} needs lora_A [r, in] and lora_B [out, r] of one rank")
        rank = max(rank, ab["A"].shape[0])
    if rank > max_rank:
        raise AdapterError(f"{folder} has rank {rank}, above this server's max_lora_rank {max_rank} "
                           "(MAX_LORA_RANK / --max-lora-rank)")
    alpha = float(cfg.get("lora_alpha", cfg["r"]))
    weights = {}
    for key, (module, parts) in served_projections(model).items():
        found = [(i, pairs.get((key[0], p.target))) for i, p in enumerate(parts)]
        if all(ab is None for _, ab in found):
            continue
        n_in, n_out = _shape(module)
        a = torch.zeros(len(parts) * max_rank, n_in, dtype=dtype)
        b = torch.zeros(n_out, len(parts) * max_rank, dtype=dtype)
        for i, ab in found:
            if ab is None:
                continue
            r = ab["A"].shape[0]
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            try:
                a[i * max_rank : i * max_rank + r] = ab["A"].float()
                b[:, i * max_rank : i * max_rank + r] = parts[i].place(ab["B"].float() * scale)
            except RuntimeError as e:  # a shape mismatch, told against the model's shapes
                raise AdapterError(f"{folder}: layer {key[0]} {parts[i].target} has lora_A {tuple(ab['A'].shape)} and "
                                   f"lora_B {tuple(ab['B'].shape)}, which do not fit this model ({e})") from None
        weights[key] = (a, b)
    return LoraAdapter(name=name, path=str(folder), rank=rank, weights=weights)


# ---------------------------------------------------------------------------------------------- device side

class LoraSlots:
    """The device buffers of ``max_loras`` adapter slots, attached to the model's served projections
    (attributes ``lora_a`` / ``lora_b`` / ``lora_parts``, read by :meth:`LoraBatch.linear`)."""

    def __init__(self, model, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be at least 1, got {max_loras} and {max_rank}")
        self.max_loras, self.max_rank = max_loras, max_rank
        param = next(model.parameters())
        self.projections = served_projections(model)
        for module, parts in self.projections.values():
            n_in, n_out = _shape(module)
            width = max_loras * len(parts) * max_rank
            module.lora_a = torch.zeros(width, n_in, dtype=param.dtype, device=param.device)
            module.lora_b = torch.zeros(n_out, width, dtype=param.dtype, device=param.device)
            module.lora_parts = len(parts)

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy ``adapter`` into ``slot`` (queued on the device's stream after the steps before it)."""
        for key, (module, parts) in self.projections.items():
            width = len(parts) * self.max_rank
            cols = slice(slot * width, (slot + 1) * width)
            ab = adapter.weights.get(key)
            if ab is None:
                module.lora_a[cols].zero_()
                module.lora_b[:, cols].zero_()
            else:
                module.lora_a[cols].copy_(ab[0], non_blocking=True)
                module.lora_b[:, cols].copy_(ab[1], non_blocking=True)

    def batch(self, slots: torch.Tensor) -> LoraBatch:
        """The LoRA state of one forward whose token rows use ``slots [T]`` (-1: base model)."""
        return LoraBatch(slots, self.max_loras, self.max_rank)


class LoraBatch:
    """Per forward: each token's slot as column masks, and the projection with its LoRA delta."""

    def __init__(self, slots: torch.Tensor, max_loras: int, max_rank: int):
        self.slots = slots
        onehot = slots.unsqueeze(1) == torch.arange(max_loras, device=slots.device)  # [T, S]; slot -1: none
        self._onehot, self._rank = onehot, max_rank
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _mask(self, parts: int, dtype: torch.dtype) -> torch.Tensor:
        mask = self._masks.get((parts, dtype))
        if mask is None:
            mask = self._onehot.to(dtype).repeat_interleave(parts * self._rank, dim=1)  # [T, S·p·r]
            self._masks[parts, dtype] = mask
        return mask

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """``layer(x)`` plus the LoRA of each row's slot (projections without slots: ``layer(x)``)."""
        y = linear(x, layer)
        a = getattr(layer, "lora_a", None)
        if a is None:
            return y
        if triton is not None and x.is_cuda and x.shape[0] <= MAX_ROWS:  # decode: only the slots in use are read
            return lora_rows(y, x.contiguous(), a, layer.lora_b, self.slots, layer.lora_parts * self._rank)
        xa = torch.nn.functional.linear(x, a) * self._mask(layer.lora_parts, x.dtype)
        return y.addmm_(xa, layer.lora_b.t())
