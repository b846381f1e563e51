"""GPTQ through GPTQModel 7.6 with a TeleChat model definition of our own.

GPTQModel ships a ``telechat`` entry (``TeleChat2QModel``) that needs the official remote code and
quantizes only ``dense`` and the MLP. We subclass :class:`gptqmodel.models.base.BaseQModel`
instead and call its ``from_pretrained`` directly: nothing in the installed package is patched
and its model registry is left alone.

Sequential groups are the official ones (SPEC.md §8): [query, key_value] → [dense] →
[gate_proj, up_proj] → [down_proj]. Inside a group GPTQModel stops the layer forward right after
the *last listed* module runs, so each group is listed in execution order (``project`` calls
``query`` before ``key_value``, the MLP ``gate_proj`` before ``up_proj``); listed the other way,
the first module never sees a sample and silently falls back to round-to-nearest.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from telechat.errors import UserError

log = logging.getLogger(__name__)

# GPTQModel sizes its CPU worker pool as (cores + 1) // 2 but asks for 2 workers when loading, so
# on a 2-core machine it fails ("requests 2 workers but parent 'cpu' only has 1"). Must be set
# before gptqmodel is imported.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))

try:
    from gptqmodel import QuantizeConfig
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.utils.model import move_to
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise UserError(f"quantization needs GPTQModel ({e.name} is missing): pip install 'telechat-stack[quant]'") from e

# Positional arguments of TelechatBlock.forward after the hidden states, replayed by name.
BLOCK_ARGS = ("cos", "sin", "mask")


class TelechatQModel(BaseQModel):
    """TeleChat (v1 7B/12B, TeleChat2) for GPTQModel: blocks ``transformer.h``, norm ``ln_f``."""

    pre_lm_head_norm_module = "transformer.ln_f"
    module_tree = [
        "transformer",
        "h",
        "#",
        {
            "input_layernorm": ("input_layernorm:!",),
            "self_attention": ("query:0", "key_value:0", "dense:1"),
            "post_attention_layernorm": ("post_attention_layernorm:!",),
            "mlp": ("gate_proj:0", "up_proj:0", "down_proj:1"),
        },
    ]

    # GPTQModel captures only the first positional input of a block and replays the rest as
    # keywords; our blocks take (x, cos, sin, mask, cache) positionally, so keep cos/sin/mask by
    # name at capture and pass exactly those back (no attention_mask/use_cache/position_ids).
    def capture_first_layer_input_kwargs(self, args, kwargs, batch_device, layer_input_kwargs):
        return {name: None if a is None else move_to(a, device=batch_device) for name, a in zip(BLOCK_ARGS, args[1:])}

    def prepare_layer_replay_kwargs(self, layer, layer_input, additional_inputs, target_device):
        return {name: additional_inputs[name] for name in BLOCK_ARGS if name in additional_inputs}


def quantize(
    model_path: Path,
    out_dir: Path,
    samples: list[list[int]],
    *,
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    dtype: torch.dtype,
    device: str,
    batch_size: int = 1,
) -> float:
    """Quantize ``model_path`` on ``samples`` and save the GPTQ checkpoint to ``out_dir``; return seconds.

    ``batch_size`` 1 by default: our blocks get padding only through their 4-D mask, which
    GPTQModel cannot see, so padded positions of a batch would enter the Hessians.
    """
    qcfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    start = time.perf_counter()
    model = TelechatQModel.from_pretrained(str(model_path), quantize_config=qcfg, dtype=dtype, device=device)
    calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]
    model.quantize(calib, batch_size=batch_size, calibration_data_min_length=1)
    _check_no_fallback(model)
    model.save(str(out_dir))
    return time.perf_counter() - start


def _check_no_fallback(model) -> None:
    """GPTQModel falls back to round-to-nearest for a module that saw no samples; refuse that."""
    log_rows = getattr(model, "quant_log", None) or []
    fallen = [f"{r.get('layer')}.{r.get('module')}" for r in log_rows if "fallback" in str(r.get("loss", ""))]
    if fallen:
        raise RuntimeError(f"GPTQ fell back to round-to-nearest for {len(fallen)} modules (first: {fallen[0]}); "
                           "the calibration data did not reach them")
