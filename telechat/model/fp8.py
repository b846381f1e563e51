"""FP8 weights: :class:`Fp8Linear` and compressed-tensors FP8 checkpoints as ``TelechatForCausalLM``.

The checkpoint format is the one llm-compressor writes and vLLM loads (docs/fine-tune-and-quant.md,
FP8 checkpoints): ``config.json`` carries a ``quantization_config`` with ``quant_method``
``compressed-tensors``, format ``float-quantized`` and one config group whose weights are 8-bit
float, symmetric, static, per output channel (or per tensor), and whose input activations are
8-bit float either dynamic per token or static per tensor (or absent: weight-only). Each
quantized Linear stores ``<layer>.weight`` (``float8_e4m3fn`` ``[out, in]``),
``<layer>.weight_scale`` (``[out, 1]``, or ``[1]`` per tensor) and, with static activations,
``<layer>.input_scale`` (``[1]``); ``weight ≈ weight_fp8 * weight_scale``. Everything else
(embeddings, norms, biases, the head unless the scheme names it) is stored as in a dense checkpoint.

Numerics: ``W ≈ Q_w · s_w`` with ``s_w = max|W_row| / 448`` (E4M3's largest finite value) and
``x ≈ Q_x · s_x`` with ``s_x = max|x_token| / 448`` (dynamic) or a calibrated constant (static).
On CUDA with compute capability 8.9+ (Ada, Hopper) the product runs as one FP8 GEMM with row /
column scales (``torch._scaled_mm``, whose row-wise path is a CUTLASS kernel); elsewhere the same
quantized values are dequantized and multiplied in the activation dtype, so CPU results (tests,
the quant report on CPU) are the GPU's math up to accumulation order and output rounding. Older
GPUs get a one-line error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from telechat.model.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    canonical_key,
    first_line,
    inspect_checkpoint,
    iter_tensors,
    resolve_device,
    resolve_dtype,
)
from telechat.model.kernels import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, quantize_rows_fp8, triton_available

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards."""

QUANT_METHOD = "compressed-tensors"
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
"""compressed-tensors formats that store FP8 weights as they are (``naive`` is the generic name)."""
ACTIVATIONS = ("dynamic", "static")
"""Activation quantization of an :class:`Fp8Linear`: dynamic per token, or static per tensor (calibrated)."""
LINEAR_TARGET = "Linear"
"""compressed-tensors target naming the module class: every ``nn.Linear`` not in ``ignore``."""
HEAD = "lm_head"
"""The output projection: dense in llm-compressor's schemes (``ignore``); FP8 too with ``--quantize-head``."""


# ---- numerics ---------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: E4M3 ``q [out, in]`` and float32 ``scale [out, 1]`` with ``weight ≈ q * scale``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(FP8_MIN_SCALE)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``x ≈ q * scale``: per token (over the last dim, ``scale [..., 1]``) when
    ``input_scale`` is None, else with that static per-tensor scale (``scale`` all ones-shaped)."""
    if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1 and triton_available():
        return quantize_rows_fp8(x, input_scale, FP8_MIN_SCALE)  # the same numbers in one launch
    if input_scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(FP8_MIN_SCALE)
    else:
        scale = input_scale.float().reshape((1,) * x.dim())
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_gemm_available(device: torch.device | str) -> bool:
    """Whether ``device`` runs FP8 GEMMs (a CUDA GPU of compute capability 8.9+)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def check_fp8_device(device: torch.device | str) -> None:
    """Raise :class:`CheckpointError` (one line) on a CUDA GPU without FP8 tensor cores."""
    device = torch.device(device)
    if device.type == "cuda" and not fp8_gemm_available(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise CheckpointError(f"FP8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada/Hopper); "
                              f"this GPU is {torch.cuda.get_device_name(device)} ({major}.{minor}); use --method gptq")


class Fp8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored as E4M3 and a float32 scale per output channel.

    State (the checkpoint's names): ``weight`` ``[out, in]`` float8_e4m3fn, ``weight_scale``
    ``[out, 1]`` float32, ``input_scale`` ``[1]`` float32 (static activations only; else None),
    ``bias`` ``[out]`` in the activation dtype or None. ``activations`` is ``"dynamic"`` (per
    token), ``"static"`` (``input_scale``) or None (weight-only: always the dequantized path).

    Fusing several of these along the output dimension (``query``+``key_value`` → ``qkv``,
    ``gate_proj``+``up_proj`` → ``gate_up``, as serving does for ``nn.Linear``) is exact: concatenate
    ``weight`` rows, ``weight_scale`` rows and biases; static ``input_scale``s of modules that read
    the same input are equal (take the max if they differ).

    Dtype casts of the model (``.half()``, ``.to(torch.bfloat16)``) cast the bias like any Linear's
    and leave ``weight`` and the scales as they are; only their device follows.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 activations: str | None = "dynamic", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if activations is not None and activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS} or None, not {activations!r}")
        if device is not None:
            check_fp8_device(device)
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        # FP8 GEMMs take widths in multiples of 16 (every TeleChat Linear); others stay on the reference path.
        self.gemm_shapes_ok = in_features % 16 == 0 and out_features % 16 == 0
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        static = activations == "static"
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.fp8_rows_in = False
        """Serving: the input comes with its FP8 rows, written by the kernel that produced it (the GEMV tuner
        times this module without the quantization launch; :func:`telechat.model.kernels.linear`)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str | None = "dynamic",
                    input_scale: float | None = None) -> Fp8Linear:
        """Quantize a dense ``nn.Linear`` (on its device; ``input_scale`` is required for static activations)."""
        if (activations == "static") != (input_scale is not None):
            raise ValueError("input_scale is required with activations='static' and only then")
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, activations=activations,
                     dtype=w.dtype, device=w.device)
        q, scale = quantize_weight(w)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        if input_scale is not None:
            module.input_scale.fill_(input_scale)
        return module

    @classmethod
    def stack(cls, parts: list[tuple[Fp8Linear, torch.Tensor | None]]) -> Fp8Linear:
        """One bias-free module whose output rows are the rows of ``parts`` in order: each part is a
        module and the output rows it gives (None: all), e.g. the K rows of a fused ``key_value``. Exact:
        rows keep their FP8 values and per-channel scales (a per-tensor scale becomes each row's);
        static input scales (of modules reading the same input) become their max."""
        first = parts[0][0]
        weights, scales = [], []
        for module, rows in parts:
            scale = module.weight_scale.expand(module.out_features, 1)
            weights.append(module.weight if rows is None else module.weight[rows])
            scales.append(scale if rows is None else scale[rows])
        w = torch.cat(weights)
        fused = cls(first.in_features, w.shape[0], bias=False, activations=first.activations, device=w.device)
        fused.weight.copy_(w)
        fused.weight_scale.copy_(torch.cat(scales))
        if first.input_scale is not None:
            fused.input_scale.copy_(torch.stack([m.input_scale for m, _ in parts]).amax(0))
        return fused

    def forward(self, x: torch.Tensor, x_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x_rows``: ``x`` already quantized per token (``(q [M, K], scale [M, 1])``, the numbers this module's
        dynamic activations would give, :func:`telechat.model.kernels.fp8_rows`), used by the FP8 GEMM."""
        if x.is_cuda and self.activations is not None and self.gemm_shapes_ok:
            return self.forward_scaled_mm(x, x_rows if self.activations == "dynamic" else None)
        return self.forward_reference(x)

    def forward_scaled_mm(self, x: torch.Tensor, x_rows: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> torch.Tensor:
        """One FP8 GEMM: quantized activations ``[M, K]`` (``x_rows``, else quantized here) × ``weightᵀ`` with
        row scales ``[M, 1]`` and column scales ``[1, N]`` (row-wise ``torch._scaled_mm``; bf16 output, the dtype
        its row-wise kernels support everywhere, cast to the activation dtype)."""
        lead = x.shape[:-1]
        q, scale = x_rows if x_rows is not None else quantize_activation(x.reshape(-1, self.in_features),
                                                                        self.input_scale)
        scale_a = scale.expand(q.shape[0], 1).contiguous()  # a static scale is [1, 1]
        fused_bias = self.bias is not None and self.bias.dtype == torch.bfloat16
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale_a, scale_b=self.weight_scale.t(),
                               bias=self.bias if fused_bias else None, out_dtype=torch.bfloat16).to(x.dtype)
        if self.bias is not None and not fused_bias:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantized values, dequantized and multiplied in ``x.dtype`` (CPU, weight-only)."""
        if self.activations is not None:
            q, scale = quantize_activation(x, self.input_scale)
            x = (q.float() * scale).to(x.dtype)
        w = (self.weight.float() * self.weight_scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse: bool = True):
        # nn.Module casts every floating-point buffer (FP8 included) on .half()/.to(dtype): keep the
        # quantized state out of ``fn`` and move it to wherever ``fn`` sends a probe tensor instead.
        device = fn(torch.empty(0, device=self.weight.device)).device
        kept = {name: self._buffers.pop(name) for name in ("weight", "weight_scale", "input_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                if t is not None and t.device != device:
                    t = torch.empty_like(t, device=device) if t.is_meta else t.to(device)
                self._buffers[name] = t
        check_fp8_device(device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations={self.activations}")


# ---- checkpoint format ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp8Scheme:
    """What a compressed-tensors FP8 ``quantization_config`` says, reduced to what loading needs."""

    activations: str | None
    """``dynamic`` (per token), ``static`` (per tensor, ``input_scale`` stored) or None (weight-only)."""
    weight_strategy: str = "channel"
    """``channel`` (``weight_scale [out, 1]``) or ``tensor`` (``[1]``, broadcast over rows on load)."""
    targets: tuple[str, ...] = (LINEAR_TARGET,)
    ignore: tuple[str, ...] = (HEAD,)

    @classmethod
    def ours(cls, activations: str | None, head: bool = False) -> Fp8Scheme:
        """The scheme ``telechat quantize --method fp8`` writes: every Linear, the head too with ``head``."""
        return cls(activations, ignore=() if head else (HEAD,))

    def quantizes(self, name: str) -> bool:
        """Whether the ``nn.Linear`` called ``name`` (our naming) is stored in FP8."""
        names = (name, name.removeprefix("transformer."))
        def hit(patterns):
            return any(_matches(n, p) for n in names for p in patterns)
        return hit(self.targets) and not hit(self.ignore)


def _matches(name: str, pattern: str) -> bool:
    """compressed-tensors matching: the class name ``Linear``, ``re:``-prefixed regex, or the exact name."""
    if pattern == LINEAR_TARGET:
        return True  # only nn.Linear modules are ever asked
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern


def fp8_quantization_config(activations: str = "dynamic", head: bool = False) -> dict:
    """``config.json`` ``quantization_config`` of the checkpoints ``telechat quantize --method fp8``
    writes: llm-compressor's ``FP8_DYNAMIC`` scheme (weights per channel, activations dynamic per
    token) or, with ``static``, per-tensor activation scales from calibration; the head stays dense
    (``ignore``) unless ``head``."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
    def args(strategy: str, dynamic: bool) -> dict:
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": strategy,
                "dynamic": dynamic}
    inputs = args("token", True) if activations == "dynamic" else args("tensor", False)
    return {
        "quant_method": QUANT_METHOD,
        "format": FLOAT_FORMATS[0],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": [LINEAR_TARGET], "weights": args("channel", False),
                                      "input_activations": inputs, "output_activations": None,
                                      "format": FLOAT_FORMATS[0]}},
        "ignore": list(Fp8Scheme.ours(activations, head).ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def read_fp8_scheme(qcfg: dict, source: str = "config.json quantization_config") -> Fp8Scheme:
    """Parse a compressed-tensors ``quantization_config``; raise :class:`CheckpointError` (naming the
    field) for anything but FP8 weights with dynamic-token / static-tensor / no activation quantization."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {what}; this runtime loads compressed-tensors FP8 checkpoints (FP8 "
                               "weights per channel or tensor, activations dynamic per token, static per tensor "
                               "or unquantized)")

    method = str(qcfg.get("quant_method", "")).lower()
    if method != QUANT_METHOD:
        raise refuse(f"quant_method is {method!r}")
    if qcfg.get("kv_cache_scheme"):
        raise refuse("kv_cache_scheme is set (an FP8 KV cache is not supported yet)")
    groups = qcfg.get("config_groups") or {}
    if len(groups) != 1:
        raise refuse(f"{len(groups)} config groups (exactly one is supported)")
    [group] = groups.values()
    if not isinstance(group, dict):
        raise refuse(f"config group is the preset {group!r} (spell out its weights)")
    fmt = group.get("format") or qcfg.get("format")
    if fmt not in FLOAT_FORMATS:
        raise refuse(f"format {fmt!r}")
    if qcfg.get("quantization_status", "compressed") != "compressed":
        raise refuse(f"quantization_status {qcfg.get('quantization_status')!r} (weights not stored compressed)")
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    if not _is_fp8(weights) or weights.get("dynamic") or weights.get("strategy") not in ("channel", "tensor"):
        raise refuse(f"weights {weights}")
    if group.get("output_activations"):
        raise refuse("output_activations are quantized")
    if inputs is None:
        activations = None
    elif _is_fp8(inputs) and inputs.get("strategy") == "token" and inputs.get("dynamic") is True:
        activations = "dynamic"
    elif _is_fp8(inputs) and inputs.get("strategy") == "tensor" and inputs.get("dynamic") is False:
        activations = "static"
    else:
        raise refuse(f"input_activations {inputs}")
    targets = tuple(group.get("targets") or ())
    if not targets:
        raise refuse("the config group has no targets")
    return Fp8Scheme(activations, weights["strategy"], targets, tuple(qcfg.get("ignore") or ()))


def fp8_head(config) -> bool:
    """Whether ``config`` (a TeleChat config) declares a compressed-tensors FP8 checkpoint whose head is FP8."""
    qcfg = getattr(config, "quantization_config", None)
    if hasattr(qcfg, "to_dict"):
        qcfg = qcfg.to_dict()
    if not isinstance(qcfg, dict) or str(qcfg.get("quant_method", "")).lower() != QUANT_METHOD:
        return False
    return read_fp8_scheme(qcfg).quantizes(HEAD)


def _is_fp8(args: dict) -> bool:
    return args.get("num_bits") == 8 and str(args.get("type")).lower() == "float" and args.get("symmetric", True) \
        and args.get("group_size") in (None, -1)


# ---- loading ----------------------------------------------------------------------------------


def load_fp8(
    path: str | Path | CheckpointInfo,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    **config_overrides,
):
    """Load a compressed-tensors FP8 TeleChat checkpoint (ours or llm-compressor's), in eval mode.

    The model is built on the meta device, every Linear the scheme quantizes becomes an
    :class:`Fp8Linear`, and tensors stream file by file onto ``device`` (no second copy).
    ``dtype`` is the activation / embedding / head dtype (``auto``: bf16 on CUDA, fp32 on CPU).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    import telechat  # noqa: F401  (registers the Auto classes)

    info = path if isinstance(path, CheckpointInfo) else inspect_checkpoint(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_fp8_device(device)
    scheme = read_fp8_scheme(info.config["quantization_config"], f"{info.path / 'config.json'} quantization_config")
    try:
        config = AutoConfig.from_pretrained(info.path, **{k: v for k, v in config_overrides.items() if v is not None})
        config.validate_telechat()
    except ValueError as e:
        raise CheckpointError(f"{info.path / 'config.json'}: {first_line(e)}") from e
    if config.tie_word_embeddings and scheme.quantizes(HEAD):
        raise CheckpointError(f"{info.path / 'config.json'}: the FP8 scheme quantizes lm_head, which "
                              "tie_word_embeddings ties to the dense embeddings; an FP8 head is stored untied "
                              "(tie_word_embeddings false, as telechat quantize --quantize-head writes it)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    swapped = replace_linears(model, scheme, torch_dtype)
    if not swapped:
        raise CheckpointError(f"{info.path}: the FP8 scheme (targets {list(scheme.targets)}, ignore "
                              f"{list(scheme.ignore)}) quantizes no Linear of this model")
    model.to_empty(device=device)
    _load_tensors(model, info, scheme)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.word_embeddings.weight
    log.info("FP8 (%s activations) on %s: %d Linears", scheme.activations or "unquantized", device, len(swapped))
    return model.eval()


def replace_linears(model: nn.Module, scheme: Fp8Scheme, dtype: torch.dtype) -> list[str]:
    """Swap every ``nn.Linear`` that ``scheme`` quantizes for an empty :class:`Fp8Linear` on the
    Linear's device; returns their names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and scheme.quantizes(name):
            parent, _, child = name.rpartition(".")
            device = module.weight.device
            fp8 = Fp8Linear(module.in_features, module.out_features, module.bias is not None,
                            activations=scheme.activations, dtype=dtype, device=device)
            setattr(model.get_submodule(parent) if parent else model, child, fp8)
            swapped.append(name)
    return swapped


def _load_tensors(model: nn.Module, info: CheckpointInfo, scheme: Fp8Scheme) -> None:
    """Copy every checkpoint tensor into ``model``; raise :class:`CheckpointError` on gaps, extras or shapes."""
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    seen: set[str] = set()
    for file in info.weight_files:
        try:
            with torch.no_grad():
                for key, tensor in iter_tensors(file):
                    name = canonical_key(key)
                    if name == "lm_head.weight" and tied:
                        continue  # the tied head is the embedding
                    target = state.get(name)
                    if target is None:
                        raise CheckpointError(f"{file} holds {key!r}, which this model has no place for; the "
                                              "checkpoint does not match config.json or its quantization_config")
                    per_tensor = name.endswith("_scale") and tensor.numel() == 1  # broadcast over rows
                    if tensor.shape != target.shape and not per_tensor:
                        raise CheckpointError(f"{file}: {key!r} has shape {list(tensor.shape)}, the model expects "
                                              f"{list(target.shape)}; the checkpoint does not match config.json")
                    target.copy_(tensor.reshape(()) if per_tensor else tensor)
                    seen.add(name)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"could not read {file} ({first_line(e)}); the file may be corrupt: "
                                  "re-download it") from e
    missing = sorted(set(state) - seen - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"{info.path} lacks {len(missing)} tensors (first: {missing[0]}); the checkpoint is "
                              f"incomplete or not the FP8 layout its config declares ({scheme.activations} activations)")
