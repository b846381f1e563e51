"""Loading a checkpoint folder as :class:`~telechat.model.modeling.TelechatForCausalLM` (dense, GPTQ or FP8)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from telechat.model.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    first_line,
    inspect_checkpoint,
    resolve_device,
    resolve_dtype,
)
from telechat.model.fp8 import QUANT_METHOD as FP8_QUANT_METHOD
from telechat.model.fp8 import load_fp8
from telechat.model.quantized import load_quantized


def load_model(
    path: str | Path | CheckpointInfo,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict | None = None,
    **config_overrides,
):
    """Load a TeleChat checkpoint (any official layout) as :class:`TelechatForCausalLM`, in eval mode.

    Weights stream shard by shard onto a meta-initialised model (no second full copy in RAM), with
    transformers' progress bar. ``config_overrides`` (e.g. ``rope_mode``, ``training_seqlen``,
    ``base_seqlen``) replace config values for this load only.
    """
    import telechat  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM

    info = path if isinstance(path, CheckpointInfo) else inspect_checkpoint(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if info.quant_method == FP8_QUANT_METHOD:
        return load_fp8(info, device=device, dtype=dtype, **config_overrides)
    if info.quantized:
        return load_quantized(info, device=device, dtype=dtype, **config_overrides)
    overrides = {k: v for k, v in config_overrides.items() if v is not None}
    try:
        config = AutoConfig.from_pretrained(info.path, **overrides)
        config.validate_telechat()  # overrides are applied after __init__'s own validation
    except ValueError as e:
        raise CheckpointError(f"{info.path / 'config.json'}: {first_line(e)}") from e
    try:
        with _quiet_generation_config():
            model, loading = AutoModelForCausalLM.from_pretrained(
                info.path, config=config, dtype=torch_dtype, device_map=device_map or device,
                output_loading_info=True,
            )
    except torch.OutOfMemoryError as e:
        raise CheckpointError(f"out of memory loading {info.path} on {device} as {torch_dtype}; use a GPU with more "
                              "memory, --device-map auto, a lower precision or a quantized checkpoint") from e
    except Exception as e:  # noqa: BLE001 - safetensors/pickle/zip errors have no common base
        raise CheckpointError(f"could not read the weights in {info.path} ({first_line(e)}); "
                              "the files may be corrupt or incomplete: re-download them") from e
    missing = [k for k in loading.get("missing_keys", ()) if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing:
        raise CheckpointError(f"{info.path} lacks {len(missing)} tensors (first: {sorted(missing)[0]}); "
                              "the checkpoint is incomplete or not a TeleChat checkpoint")
    model.eval()
    return model


@contextmanager
def _quiet_generation_config() -> Iterator[None]:
    """transformers validates a checkpoint's ``generation_config.json`` when it loads the model and warns
    about sampling fields beside ``do_sample: false`` (the official files have them); we read those
    defaults ourselves (``CheckpointInfo.generation``), so while loading the warning is noise."""
    logger = logging.getLogger("transformers.generation.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
