"""GPTQ checkpoints as :class:`~telechat.model.modeling.TelechatForCausalLM` with quantized Linears.

Two layouts load (docs/fine-tune-and-quant.md, GPTQ):

- ours (``telechat quantize``, GPTQModel): ``config.json`` with ``quantization_config``, a
  ``quantize_config.json``, ``model.safetensors`` (or shards) with ``transformer.``-prefixed keys;
- the official AutoGPTQ 0.3 release: ``config.json`` *without* ``quantization_config``, a
  ``quantize_config.json`` and ``gptq_model-{bits}bit-{group}g.bin|.safetensors``; 7B keys carry
  no ``transformer.`` prefix and no ``lm_head`` (tied).

Both store AutoGPTQ "v1" packed tensors per Linear (``qweight``, ``qzeros``, ``scales``,
``g_idx``, ``bias``). The model is built on the meta device, every Linear inside
``transformer.h`` is swapped for the kernel optimum/GPTQModel picks for the device (Marlin-class
on CUDA, a torch kernel on CPU; ``backend`` overrides), the tensors are copied in and the kernel's
post-init (v1→v2 zero-point conversion, repacking) runs. ``lm_head`` and the embeddings stay in
``dtype``. The attention and MLP modules only call ``self.query(x)`` etc., so ``generate()`` and
the serving engine run the quantized model unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from telechat.model.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    canonical_key,
    first_line,
    inspect_checkpoint,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)

QUANTIZE_CONFIG = "quantize_config.json"
BLOCKS = "transformer.h"
"""Module path of the decoder blocks whose Linears are quantized (lm_head stays dense)."""
SUPPORTED_BITS = (2, 3, 4, 8)
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
"""What a GPTQ checkpoint stores per quantized Linear; a kernel's other buffers are its own state."""
CUDA_BACKENDS = ("gptq_marlin", "gptq_triton", "gptq_torch")
"""``backend="auto"`` on CUDA, fastest first. Marlin and Triton build from files installed with
GPTQModel; GPTQModel's own pick on Hopper (Machete) downloads CUTLASS at first use, which an
offline server cannot, and nothing here may download at run time."""
KERNEL_ERRORS = (ValueError, NotImplementedError, ImportError, RuntimeError, OSError)
"""How a kernel that cannot run here fails: unsupported config, missing extension, failed JIT build."""


def read_quantize_config(path: str | Path) -> dict:
    """The GPTQ settings of a checkpoint folder: ``config.json`` ``quantization_config``, else
    ``quantize_config.json`` (the official release has only the latter). Raises
    :class:`CheckpointError` when neither describes a GPTQ checkpoint we can run."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    qcfg = config.get("quantization_config")
    source = "config.json quantization_config"
    if qcfg is None and (path / QUANTIZE_CONFIG).is_file():
        qcfg = json.loads((path / QUANTIZE_CONFIG).read_text(encoding="utf-8"))
        source = QUANTIZE_CONFIG
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{path} has no GPTQ settings (config.json quantization_config or {QUANTIZE_CONFIG})")
    method = str(qcfg.get("quant_method", qcfg.get("method", "gptq"))).lower()
    if method != "gptq":
        raise CheckpointError(f"{path}: {source} declares quant_method={method!r}; only GPTQ checkpoints are supported")
    if qcfg.get("bits") not in SUPPORTED_BITS:
        raise CheckpointError(f"{path}: {source} has bits={qcfg.get('bits')!r}; GPTQ supports {SUPPORTED_BITS}")
    return qcfg


def _require_backend() -> None:
    try:
        import gptqmodel  # noqa: F401
        import optimum.gptq  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"this checkpoint is GPTQ-quantized and loading it needs the quant extra ({e.name} "
                              "is missing): pip install 'telechat-stack[quant]'") from e


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    # Official AutoGPTQ releases ship torch.save pickles; weights_only refuses arbitrary objects.
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def load_quantized(
    path: str | Path | CheckpointInfo,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    backend: str = "auto",
    compile_kernels: bool | None = None,
    **config_overrides,
):
    """Load a GPTQ TeleChat checkpoint (ours or the official AutoGPTQ layout), in eval mode.

    ``dtype`` is the activation / embedding / ``lm_head`` dtype (``auto``: fp16 on CUDA, fp32 on
    CPU). ``backend`` is a GPTQModel backend name; ``auto`` tries :data:`CUDA_BACKENDS` in order on
    CUDA and lets GPTQModel pick on other devices. ``compile_kernels`` lets GPTQModel's torch
    kernels ``torch.compile`` their dequantizer (default: on CUDA only).
    """
    _require_backend()
    from transformers import AutoConfig

    import telechat  # noqa: F401  (registers the Auto classes)

    info = path if isinstance(path, CheckpointInfo) else inspect_checkpoint(path)
    device = resolve_device(device)
    # GPTQ scales are stored in fp16 and the kernels run in the activation dtype: bf16 would round
    # every scale to 8 mantissa bits, so "auto" means fp16 on CUDA here.
    auto_fp16 = dtype == "auto" and device.startswith("cuda")
    torch_dtype = torch.float16 if auto_fp16 else resolve_dtype(dtype, device)
    qcfg = read_quantize_config(info.path)
    overrides = {k: v for k, v in config_overrides.items() if v is not None}
    config = AutoConfig.from_pretrained(info.path, **overrides)
    candidates = CUDA_BACKENDS if backend == "auto" and device.startswith("cuda") else (backend,)
    for i, name in enumerate(candidates):
        try:
            model = _build(info, config, qcfg, device, torch_dtype, name, compile_kernels)
            break
        except CheckpointError:
            raise
        except KERNEL_ERRORS as e:
            reason = first_line(e)
            if i + 1 == len(candidates):
                raise CheckpointError(f"no GPTQ kernel for int{qcfg['bits']} on {device} works here "
                                      f"(last tried {name}: {reason})") from e
            log.warning("GPTQ kernel %s is unavailable here (%s); trying %s", name, reason, candidates[i + 1])
    model.config.quantization_config = qcfg
    return model.eval()


def _build(info, config, qcfg: dict, device: str, dtype: torch.dtype, backend: str, compile_kernels: bool | None):
    """The quantized model with ``backend``'s kernel, weights loaded and post-init run."""
    from optimum.gptq import GPTQQuantizer
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer = GPTQQuantizer(
        bits=qcfg["bits"], group_size=qcfg.get("group_size", 128), desc_act=bool(qcfg.get("desc_act", False)),
        sym=bool(qcfg.get("sym", True)), format=qcfg.get("checkpoint_format", qcfg.get("format", "gptq")),
        meta=qcfg.get("meta"), block_name_to_quantize=BLOCKS, backend=backend,
    )
    quantizer.convert_model(model, device_map={"": device})
    log.info("GPTQ int%d (group %s) on %s: kernel %s", qcfg["bits"], qcfg.get("group_size"), device,
             quantizer.quant_linear.__name__)
    if not (device.startswith("cuda") if compile_kernels is None else compile_kernels):
        # The torch kernels compile their dequantizer with inductor at post-init, paid at the first
        # forward: about a minute per process on 2 CPU cores, more than a CPU (demo/test) run gains.
        for module in model.modules():
            if isinstance(module, quantizer.quant_linear):
                module.optimized = True
    model.to_empty(device=device)
    _load_tensors(model, info.weight_files, info.path, kernel_state=_kernel_buffers(model, quantizer.quant_linear))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.word_embeddings.weight
    # v1 → v2 zero points and kernel-specific repacking / scratch buffers (JIT-built kernels
    # compile here, so a kernel that cannot build fails here and the caller tries the next).
    return quantizer.post_init_model(model)


def _kernel_buffers(model, quant_linear: type) -> set[str]:
    """Buffers that a kernel keeps beside the GPTQ tensors (e.g. Machete's ``input_perm`` on
    Hopper), filled by its post-init and never stored in a checkpoint."""
    return {f"{name}.{buffer}" for name, module in model.named_modules() if isinstance(module, quant_linear)
            for buffer, _ in module.named_buffers(recurse=False) if buffer not in GPTQ_TENSORS}


def _load_tensors(model, files: tuple[Path, ...], folder: Path, kernel_state: set[str]) -> None:
    """Copy every checkpoint tensor into ``model``; raise :class:`CheckpointError` on gaps or extras.

    ``kernel_state`` names buffers the checkpoint does not hold: neither required nor accepted.
    """
    expected = set(model.state_dict()) - kernel_state
    seen: set[str] = set()
    for file in files:
        try:
            raw = _read_tensors(file)
        except (OSError, RuntimeError, ValueError, EOFError) as e:
            raise CheckpointError(f"could not read {file} ({e}); the file may be corrupt: re-download it") from e
        tensors = {}
        for key, tensor in raw.items():
            name = canonical_key(key)
            if name in expected:
                tensors[name] = tensor
            elif name.endswith(".bias") and not tensor.any():
                # AutoGPTQ writes an all-zero bias buffer for Linears that have none (query, key_value, ...).
                continue
            else:
                raise CheckpointError(f"{file} holds {key!r}, which this model has no place for; the checkpoint does "
                                      "not match config.json (wrong model size or not a TeleChat GPTQ checkpoint)")
        model.load_state_dict(tensors, strict=False)
        seen.update(tensors)
    missing = sorted(expected - seen - ({"lm_head.weight"} if model.config.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensors (first: {missing[0]}); the checkpoint is "
                              "incomplete or was quantized with a different layout")
