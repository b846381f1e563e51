"""GPTQ through GPTQModel 7.6 with a TeleChat model definition of our own.

GPTQModel ships a ``telechat`` entry (``TeleChat2QModel``) that needs the official remote code and
quantizes only ``dense`` and the MLP. We subclass :class:`gptqmodel.models.base.BaseQModel`
instead and call its ``from_pretrained`` directly: nothing in the installed package is patched
and its model registry is left alone.

Sequential groups are the official ones (docs/fine-tune-and-quant.md, GPTQ): [query, key_value] → [dense] →
[gate_proj, up_proj] → [down_proj]. Inside a group GPTQModel stops the layer forward right after
the *last listed* module runs, so each group is listed in execution order (``project`` calls
``query`` before ``key_value``, the MLP ``gate_proj`` before ``up_proj``); listed the other way,
the first module never sees a sample and silently falls back to round-to-nearest.

GPTQModel runs in a scratch folder of ours (:func:`sandbox`): its temporary folders (the disk
offload, otherwise an anonymous ``/tmp/gptqmodel_*``) and the ``logs/`` folder it makes in the
working directory land there, and its console output goes to ``gptqmodel.log`` there. The job
removes the folder when it ends; after a kill, the next job does (:mod:`jobs.output`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from jobs.quiet import captured_output, import_gptqmodel_quietly
from telechat.errors import UserError

log = logging.getLogger(__name__)

import_gptqmodel_quietly()
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
    work: Path,
    batch_size: int = 1,
) -> float:
    """Quantize ``model_path`` on ``samples`` and save the GPTQ checkpoint to ``out_dir``; return seconds.

    ``work`` is GPTQModel's scratch folder (:func:`sandbox`). ``batch_size`` 1 by default: our
    blocks get padding only through their 4-D mask, which GPTQModel cannot see, so padded
    positions of a batch would enter the Hessians.
    """
    model_path, out_dir = model_path.resolve(), out_dir.resolve()
    start = time.perf_counter()
    with sandbox(work):
        qcfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
        model = TelechatQModel.from_pretrained(str(model_path), quantize_config=qcfg, dtype=dtype, device=device)
        calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]
        model.quantize(calib, batch_size=batch_size, calibration_data_min_length=1)
        _check_no_fallback(model)
        model.save(str(out_dir))
    return time.perf_counter() - start


@contextlib.contextmanager
def sandbox(work: Path) -> Iterator[None]:
    """Run GPTQModel with ``work`` as working and temporary directory, its output to ``work/gptqmodel.log``."""
    previous_cwd, previous_tmp = Path.cwd(), tempfile.tempdir
    os.chdir(work)
    tempfile.tempdir = str(work)
    try:
        with captured_output(work / "gptqmodel.log"):
            yield
    finally:
        tempfile.tempdir = previous_tmp
        os.chdir(previous_cwd)


def _check_no_fallback(model) -> None:
    """GPTQModel falls back to round-to-nearest for a module that saw no samples; refuse that."""
    log_rows = getattr(model, "quant_log", None) or []
    fallen = [f"{r.get('layer')}.{r.get('module')}" for r in log_rows if "fallback" in str(r.get("loss", ""))]
    if fallen:
        raise RuntimeError(f"GPTQ fell back to round-to-nearest for {len(fallen)} modules (first: {fallen[0]}); "
                           "the calibration data did not reach them")
