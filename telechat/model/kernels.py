"""Fused inference kernels for the serving hot path (Triton on CUDA, PyTorch elsewhere).

A decode step of the 7B model ran ~40 small kernels per layer in eager PyTorch (norms,
rotary, activation, cache writes), which cost as much as the weight reads at batch 1. Each
function here does one of those groups in one launch on CUDA, and falls back to the reference
PyTorch ops on CPU, under autograd, or without Triton — same numerics (fp32 inside, one
rounding to the input dtype as in the reference).

The last section is a GEMV for decode batches of 1-64 rows: cuBLAS reads the weights of the 7B's
mid-size projections at only 45-85 % of copy bandwidth on an H200 (99 % for the lm_head), and
``_scaled_mm`` reads FP8 weights at 23-57 %. The Triton GEMV comes as FMA reductions, tensor-core
tiles (FP8 weights: converted in registers, or FP8 × FP8 with x quantized per token) and split-K
(reduced by a second launch or by the last program of a row block); :func:`tune_gemv` times the
layer's own GEMM and the tilings per shape in CUDA graphs when the engine starts and :func:`linear`
uses whichever won (bench/gemv.py measures every tiling).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs
    triton = None

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
"""448: E4M3's largest finite value (FP8 weights and the FP8 KV cache saturate to it)."""
FP8_MIN_SCALE = 1e-12
"""Floor of every FP8 scale, so an all-zero row (token) quantizes to zeros instead of 0/0."""


def triton_available() -> bool:
    """Whether the Triton kernels can run here (CUDA builds of torch ship Triton; CPU installs do not)."""
    return triton is not None


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and not torch.is_grad_enabled()


# ---------------------------------------------------------------------------- programmatic dependent launch

PDL = True
"""Launch the decode kernels with programmatic dependent launch where the GPU has it (Hopper and newer):
each kernel lets the next one in the stream start at once and waits for its predecessor only before it
reads what that one wrote, so launch latency and ramp-up overlap the previous kernel's tail (a bs1 decode
step is ~270 dependent kernels), and a GEMV reads its first weight tile before it waits. ``False``
launches them plainly (bench/profile_decode.py measures both)."""
PDL_MAX_ROWS = 16
"""Launches over more rows (tokens) than this run plainly: on an H200 PDL made 7B decode steps 5-7 % faster
at 1 row, ~1 % at 4 and 16, and 0.6 % / 2 % slower at 32 / 64 rows (bench/RESULTS.md)."""


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_launch(device: torch.device, rows: int) -> bool:
    """Whether a kernel over ``rows`` rows on ``device`` launches with programmatic dependent launch
    (:data:`PDL`, :data:`PDL_MAX_ROWS`): CUDA sm90+, not while torch.compile traces (it does not pass the
    launch option)."""
    return (PDL and rows <= PDL_MAX_ROWS and device.type == "cuda" and not torch.compiler.is_compiling()
            and _pdl_capable(device.index if device.index is not None else torch.cuda.current_device()))


def pdl_options(device: torch.device, rows: int) -> dict[str, bool]:
    """The launch options of a decode kernel taking a ``PDL`` constexpr: it waits for its predecessor
    (``PDL``) exactly when it may start before that one ends (``launch_pdl``), so the two come as one."""
    on = pdl_launch(device, rows)
    return {"PDL": on, "launch_pdl": on}


if triton is not None:

    @triton.jit
    def pdl_release(PDL: tl.constexpr):
        """Let the next kernel in the stream launch now (it waits in :func:`pdl_wait` before using our output)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel in the stream has finished and its writes are visible; every kernel
        launched with ``launch_pdl`` calls this before it reads or writes memory another kernel touches."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_begin(PDL: tl.constexpr):
        """The start of a kernel that needs its inputs at once: :func:`pdl_release`, then :func:`pdl_wait`."""
        pdl_release(PDL)
        pdl_wait(PDL)


# ---------------------------------------------------------------------------- RMSNorm

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight-only RMSNorm: normalise in float32, cast back, then scale (Llama order)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


FP8_ROWS = "fp8_rows"
"""Attribute under which a kernel's bf16/fp16 output may carry its own FP8 quantization per row, ``(q [M, K] E4M3,
scale [M, 1] float32)`` — what :func:`quantize_rows_fp8` would make of it, written by the same launch (the norms
with ``quantize=True``), so an FP8 Linear with dynamic activations reading that output skips its own
quantization launch (:func:`linear`)."""


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The FP8 rows ``x`` carries (:data:`FP8_ROWS`), else None (always while torch.compile traces)."""
    return None if torch.compiler.is_compiling() else getattr(x, FP8_ROWS, None)


def _with_fp8_rows(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    setattr(out, FP8_ROWS, (q, scale))
    return out


def _fp8_row_buffers(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, cols, dtype=FP8_DTYPE, device=device),
            torch.empty(rows, 1, dtype=torch.float32, device=device))


def _quantizes(x: torch.Tensor, quantize: bool) -> bool:
    """Whether a launch writes FP8 rows too: asked, for a 2-D ``x``, and not while torch.compile traces (no tensor
    attributes)."""
    return quantize and x.dim() == 2 and not torch.compiler.is_compiling()


if triton is not None:

    @triton.jit
    def _store_fp8_row(v, cols, mask, q_ptr, s_ptr, row, stride_q, inv_max, min_scale):
        """Quantize one whole row ``v`` (fp32 values of the rounded output at ``cols``) as :func:`quantize_rows_fp8`
        does: ``scale = max(max|v| / 448, min_scale)``, ``q = clamp(v / scale, ±448)``."""
        scale = tl.maximum(tl.max(tl.where(mask, tl.abs(v), 0.0), axis=0) * inv_max, min_scale)
        tl.store(s_ptr + row, scale)
        q = tl.clamp(tl.math.div_rn(v, scale), -448.0, 448.0)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, q_ptr, s_ptr, stride, n_cols, eps, inv_max, min_scale,
                         BLOCK: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr):
        pdl_begin(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        normed = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride + cols, out, mask=mask)
        if QUANT:
            _store_fp8_row(out.to(tl.float32), cols, mask, q_ptr, s_ptr, row, n_cols, inv_max, min_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim; one Triton launch for inference on CUDA, which with ``quantize`` also
    writes the output's FP8 rows (:func:`fp8_rows`; a 2-D ``x`` only)."""
    if not _use_triton(x) or x.dtype != weight.dtype:
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    quant = _quantizes(x, quantize)
    q, scale = _fp8_row_buffers(*x2.shape, x.device) if quant else (out, out)
    pdl = pdl_options(x.device, x2.shape[0])
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, q, scale, x2.stride(0), x2.shape[1], eps, 1.0 / FP8_MAX,
                                     FP8_MIN_SCALE, BLOCK=triton.next_power_of_2(x2.shape[1]), QUANT=quant, **pdl)
    out = out.view_as(x)
    return _with_fp8_rows(out, q, scale) if quant else out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (rounded to the input dtype) and ``rms_norm(h)``: returns ``(normed, h)``.

    The pre-norm block's residual add and the next norm in one launch for inference on CUDA; the
    same numerics as the reference ops (an add in the input dtype, then :func:`rms_norm_reference`).
    With ``quantize`` (2-D inputs) the launch also writes ``normed``'s FP8 rows (:func:`fp8_rows`).
    """
    if not _use_triton(x) or x.dtype != weight.dtype or residual.dtype != x.dtype:
        h = x + residual
        return rms_norm_reference(h, weight, eps), h
    return _launch_add_rms_norm(x, residual, weight, eps, _quantizes(x, quantize))


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, q_ptr, s_ptr, stride_x, stride_r, n_cols, eps,
                             inv_max, min_scale, BLOCK: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr):
        pdl_begin(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)  # the residual stream keeps the model dtype, as in eager
        tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / n_cols
        normed = (hf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = (w * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * n_cols + cols, out, mask=mask)
        if QUANT:
            _store_fp8_row(out.to(tl.float32), cols, mask, q_ptr, s_ptr, row, n_cols, inv_max, min_scale)


def _launch_add_rms_norm(x, residual, weight, eps, quant: bool):
    n = x.shape[-1]
    x2, r2 = x.reshape(-1, n), residual.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(out)
    q, scale = _fp8_row_buffers(*x2.shape, x.device) if quant else (out, out)
    pdl = pdl_options(x.device, x2.shape[0])
    _add_rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, h, q, scale, x2.stride(0), r2.stride(0), n, eps,
                                         1.0 / FP8_MAX, FP8_MIN_SCALE, BLOCK=triton.next_power_of_2(n), QUANT=quant,
                                         **pdl)
    out = out.view(x.shape)
    return (_with_fp8_rows(out, q, scale) if quant else out), h.view(x.shape)


# ---------------------------------------------------------------------------- SwiGLU

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        pdl_begin(PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
        # silu rounded to the model dtype, then the product rounded once: torch's eager numerics
        act = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * n_cols + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; one Triton launch for inference on CUDA."""
    if not _use_triton(gate):
        return F.silu(gate) * up
    f = gate.shape[-1]
    return _launch_silu_mul(gate.reshape(-1, f).contiguous(), up.reshape(-1, f).contiguous(), f).view(gate.shape)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``gate_up = [a | b]`` split in halves along the last dim (the fused
    ``gate_up`` projection's output); one Triton launch for inference on CUDA."""
    f = gate_up.shape[-1] // 2
    if not _use_triton(gate_up):
        gate, up = gate_up.split(f, dim=-1)
        return F.silu(gate) * up
    x2 = gate_up.reshape(-1, 2 * f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _launch_silu_mul(x2, x2[:, f:], f).view(*gate_up.shape[:-1], f)


def _launch_silu_mul(gate: torch.Tensor, up: torch.Tensor, f: int) -> torch.Tensor:
    """``gate, up``: ``[rows, ≥f]`` views with unit column stride; returns ``[rows, f]``."""
    out = torch.empty(gate.shape[0], f, dtype=gate.dtype, device=gate.device)
    block = 1024
    pdl = pdl_options(gate.device, gate.shape[0])
    _silu_mul_kernel[(gate.shape[0], triton.cdiv(f, block))](gate, up, out, f, gate.stride(0), up.stride(0),
                                                              BLOCK=block, **pdl)
    return out


# ---------------------------------------------------------------------------- FP8 activation quantization

if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, n_cols, stride_x, stride_q, inv_max, min_scale,
                              STATIC: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_begin(PDL)
        row = tl.program_id(0)
        x_row = x_ptr + row * stride_x
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, n_cols, BLOCK):
                offs = c + tl.arange(0, BLOCK)
                amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)))
            # times 1/448 in fp32: how PyTorch on CUDA divides a tensor by a Python number
            scale = tl.maximum(tl.max(amax, axis=0) * inv_max, min_scale)
        tl.store(s_ptr + row, scale)
        for c in range(0, n_cols, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
            tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows_fp8(x: torch.Tensor, static_scale: torch.Tensor | None, min_scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 ``q [M, K]`` and float32 ``scale [M, 1]`` with ``x ≈ q * scale`` for a CUDA ``x [M, K]``, in one
    launch: per row ``scale = max(max|x| / 448, min_scale)`` (or ``static_scale [1]`` for every row), then
    ``q = clamp(x / scale, ±448)`` — the numbers of :func:`telechat.model.fp8.quantize_activation`."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    static = static_scale if static_scale is not None else scale
    pdl = pdl_options(x.device, m)
    _quantize_rows_kernel[(m,)](x, q, scale, static, k, x.stride(0), q.stride(0), 1.0 / FP8_MAX, min_scale,
                                STATIC=static_scale is not None, BLOCK=min(4096, triton.next_power_of_2(k)),
                                num_warps=8, **pdl)
    return q, scale


# ---------------------------------------------------------------------------- rotary + KV write

if triton is not None:

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, kc_ptr, vc_ptr, q_out_ptr,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                           stride_ct, stride_cs, stride_ch, k_scale, v_scale,
                           n_q, n_kv, HALF: tl.constexpr, H_PAD: tl.constexpr, FP8: tl.constexpr,
                           PDL: tl.constexpr):
        pdl_begin(PDL)
        t = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, H_PAD)
        mask = offs < HALF
        cos1 = tl.load(cos_ptr + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        if head < n_q:
            base = q_ptr + t * stride_qt + head * stride_qh
            x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            dst = q_out_ptr + t * stride_ot + head * stride_oh
            tl.store(dst + offs, (x1 * cos1 - x2 * sin1).to(q_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + offs, (x2 * cos2 + x1 * sin2).to(q_out_ptr.dtype.element_ty), mask=mask)
        else:
            h = head - n_q
            slot = tl.load(slots_ptr + t).to(tl.int64)
            base = k_ptr + t * stride_kt + h * stride_kh
            x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            kdst = kc_ptr + slot * stride_cs + h * stride_ch
            vbase = v_ptr + t * stride_vt + h * stride_vh
            vdst = vc_ptr + slot * stride_cs + h * stride_ch
            k1, k2 = x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2
            if FP8:  # stored = value / scale, saturated; rotated k rounded to the input dtype first, as in PyTorch
                k1 = k1.to(k_ptr.dtype.element_ty).to(tl.float32)
                k2 = k2.to(k_ptr.dtype.element_ty).to(tl.float32)
                v1 = tl.load(vbase + offs, mask=mask, other=0.0).to(tl.float32)
                v2 = tl.load(vbase + HALF + offs, mask=mask, other=0.0).to(tl.float32)
                k1 = tl.clamp(k1 / k_scale, -448.0, 448.0)
                k2 = tl.clamp(k2 / k_scale, -448.0, 448.0)
                v1 = tl.clamp(v1 / v_scale, -448.0, 448.0)
                v2 = tl.clamp(v2 / v_scale, -448.0, 448.0)
                tl.store(vdst + offs, v1.to(vc_ptr.dtype.element_ty), mask=mask)
                tl.store(vdst + HALF + offs, v2.to(vc_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(vdst + offs, tl.load(vbase + offs, mask=mask), mask=mask)
                tl.store(vdst + HALF + offs, tl.load(vbase + HALF + offs, mask=mask), mask=mask)
            tl.store(kdst + offs, k1.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(kdst + HALF + offs, k2.to(kc_ptr.dtype.element_ty), mask=mask)


def rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> torch.Tensor:
    """Rotate q and k (``[T, heads, d]``, any row and head strides) by ``cos/sin [T, d]``, store the
    rotated k and v at ``slots`` of the caches (``[slots, n_kv, d]``), return the rotated q. An FP8
    cache stores ``value / scale`` saturated to ±448."""
    from telechat.model.rope import apply_rope

    if not _use_triton(q) or any(t.stride(-1) != 1 for t in (q, k, v, cos, sin)) or cos.stride() != sin.stride():
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        store_kv(k_cache, slots, apply_rope(k, c, s), k_scale)
        store_kv(v_cache, slots, v, v_scale)
        return apply_rope(q, c, s)
    return _launch_rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots, k_scale, v_scale)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` stores it: divided by ``scale`` and saturated when FP8."""
    if dtype != FP8_DTYPE:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def store_kv(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """``cache[slots] = x`` as the cache stores it (:func:`quantize_kv`). FP8 caches are written through a
    byte view: CUDA has no indexed write for float8 tensors."""
    values = quantize_kv(x, scale, cache.dtype)
    if cache.dtype == FP8_DTYPE:
        cache.view(torch.uint8)[slots] = values.view(torch.uint8)
    else:
        cache[slots] = values


def _launch_rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots, k_scale, v_scale):
    t, n_q, d = q.shape
    n_kv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    pdl = pdl_options(q.device, t)
    _rope_cache_kernel[(t, n_q + n_kv)](
        q, k, v, cos, sin, slots, k_cache, v_cache, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
        q_out.stride(1), cos.stride(0), k_cache.stride(0), k_cache.stride(1), float(k_scale), float(v_scale),
        n_q, n_kv, HALF=d // 2, H_PAD=triton.next_power_of_2(d // 2), FP8=k_cache.dtype == FP8_DTYPE,
        **pdl,
    )
    return q_out


# ---------------------------------------------------------------------------- GEMV for decode batches

@dataclass(frozen=True)
class GemvConfig:
    """One tiling of the Triton GEMV ``y[M, N] = x[M, K] @ W[N, K]^T``."""

    block_n: int
    """Weight rows (outputs) per program."""
    block_k: int
    """Weight columns read per loop iteration."""
    split_k: int = 1
    """Programs sharing one row block, each over a slice of K (fp32 partials summed afterwards);
    more programs in flight for shapes with few output rows."""
    kind: str = "fma"
    """``"fma"``: fp32 multiply-adds on the loaded tile, one row of x kept as a [block_n, block_k] fp32
    accumulator summed once at the end (more rows: a sum per tile); ``"dot"``: tensor-core ``tl.dot(x, Wᵀ)``
    on x padded to 16 rows; ``"dot_w"``: ``tl.dot(W, xᵀ)``, the weight tile as the wide operand (swap-AB,
    Hopper's wgmma shape when ``block_n`` ≥ 64); ``"dot8"``: FP8 weights only, swap-AB on FP8 tensor cores
    with x quantized per token first (one more launch; the FP8 Linear's own numerics, no weight
    conversion in the loop)."""
    pipelined: bool = False
    """FMA at one row: the weight and x tiles stream through shared memory (cp.async), ``num_stages`` deep — Triton's
    loop pipeliner — instead of straight into registers."""
    serial_reduce: bool = False
    """With ``split_k`` > 1: the last program of a row block (an atomic counter) sums the partials, adds
    the bias and writes the output; else a second launch does. The counters reset themselves, so a
    captured CUDA graph replays correctly."""
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        if self.kind not in GEMV_KINDS:
            raise ValueError(f"GemvConfig kind must be one of {GEMV_KINDS}, got {self.kind!r}")
        if self.pipelined and self.kind != "fma":
            raise ValueError(f"GemvConfig pipelined applies to the 'fma' kind only, got {self.kind!r}")

    @property
    def max_m(self) -> int:
        """Most rows of x this tiling takes: with tensor cores up to 64 (x padded to 16, 32 or 64 rows)
        while the pipelined tiles fit a Hopper SM's shared memory; FMA tiles keep ≤ 128 fp32 products
        per thread (8 rows at most), and a ``pipelined`` one takes one row (more rows run the loop it
        shares with its plain twin, which the tuner already times)."""
        if self.pipelined:
            return 1
        if self.kind != "fma":
            size = 1 if self.kind == "dot8" else 2  # bytes per element of both tiles
            fits = [p for p in (16, 32, 64) if self.num_stages * self.block_k * size * (self.block_n + p) <= SMEM_BYTES]
            return min(max(fits, default=0), GEMV_MAX_M)
        m = 1
        while m < 8 and 2 * m * self.block_n * self.block_k <= 128 * 32 * self.num_warps:
            m *= 2
        return m


GEMV_KINDS = ("fma", "dot", "dot_w", "dot8")
GEMV_MAX_M = 64
"""Rows of x up to which :func:`linear` considers the GEMV (decode batches of the first graph buckets);
FMA tilings take at most 8, tensor-core tilings all (x padded to 16, 32 or 64 rows)."""
SMEM_BYTES = 232448
"""Shared memory one program may use on an H100/H200 (227 KiB): bounds the rows a tensor-core tiling takes."""
GEMV_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Row counts tuned; other counts up to 64 use the next bucket's choice."""
GEMV_DEFAULT = GemvConfig(16, 256, kind="dot")
"""A tiling for any row count up to 8 (what :func:`gemv` uses unless told)."""
GEMV_DOT8_TUNED = (
    GemvConfig(128, 128, kind="dot8", num_stages=4),
    GemvConfig(128, 256, kind="dot8", num_stages=4),
    GemvConfig(64, 256, kind="dot8", num_stages=4),
    GemvConfig(128, 256, kind="dot8", num_warps=8, num_stages=4),
    GemvConfig(64, 512, kind="dot8", num_stages=3),
    GemvConfig(128, 256, split_k=2, kind="dot8", serial_reduce=True, num_stages=4),
    GemvConfig(64, 256, split_k=4, kind="dot8", serial_reduce=True, num_stages=4),
)
"""FP8 tensor-core tilings (FP8 Linears that quantize activations) in :data:`GEMV_CONFIGS`: those that won a
7B shape at 2-64 rows on an H200."""
GEMV_FMA_PIPELINED = (
    GemvConfig(8, 256, num_warps=2, num_stages=4, pipelined=True),
    GemvConfig(8, 512, num_stages=3, pipelined=True),
    GemvConfig(8, 1024, num_stages=3, pipelined=True),
    GemvConfig(8, 1024, num_stages=2, pipelined=True),
    GemvConfig(16, 512, num_stages=3, pipelined=True),
)
"""FMA tilings whose one-row loop streams the tiles through shared memory (in :data:`GEMV_CONFIGS`): FP8 weights
at one row read 3-5 points more of copy bandwidth than with the tiles loaded straight into registers (bf16: no gain)."""
GEMV_CANDIDATES = (
    # FMA, the weight stream through registers
    GemvConfig(8, 512, num_stages=3),
    GemvConfig(16, 512, num_stages=3),
    GemvConfig(16, 256, num_stages=4),
    GemvConfig(32, 256, num_warps=8, num_stages=3),
    GemvConfig(32, 512, num_warps=8, num_stages=3),
    GemvConfig(8, 256, num_warps=2, num_stages=4),
    GemvConfig(8, 1024, num_stages=2),
    GemvConfig(16, 1024, num_warps=8, num_stages=2),
    GemvConfig(16, 512, num_stages=1),
    GemvConfig(32, 512, num_warps=8, num_stages=1),
    # FMA split-K: several waves of programs for the small shapes
    GemvConfig(16, 512, split_k=2, serial_reduce=True, num_stages=3),
    GemvConfig(16, 512, split_k=4, serial_reduce=True, num_stages=3),
    GemvConfig(16, 512, split_k=4, num_stages=3),
    GemvConfig(8, 512, split_k=8, serial_reduce=True, num_stages=2),
    GemvConfig(16, 256, split_k=4, serial_reduce=True, num_stages=4),
    # tensor cores, x as the 16-row operand (the previous kernel)
    GEMV_DEFAULT,
    GemvConfig(32, 256, kind="dot"),
    GemvConfig(32, 256, split_k=4, kind="dot", serial_reduce=True),
    # tensor cores, swap-AB
    GemvConfig(64, 128, kind="dot_w"),
    GemvConfig(64, 256, kind="dot_w", num_stages=3),
    GemvConfig(128, 128, kind="dot_w", num_stages=4),
    GemvConfig(128, 256, kind="dot_w", num_warps=8, num_stages=3),
    GemvConfig(64, 128, split_k=4, kind="dot_w", serial_reduce=True),
    GemvConfig(64, 256, split_k=2, kind="dot_w", serial_reduce=True, num_stages=3),
    # FP8 weights (one byte each): longer rows per iteration, more bytes in flight per program
    GemvConfig(8, 1024, num_stages=3),
    GemvConfig(8, 1024, num_stages=4),
    GemvConfig(4, 2048, num_stages=3),
    GemvConfig(16, 1024, num_warps=8, num_stages=3),
    GemvConfig(8, 2048, num_warps=8, num_stages=2),
    GemvConfig(8, 1024, split_k=2, serial_reduce=True, num_stages=3),
    GemvConfig(16, 1024, split_k=2, serial_reduce=True, num_warps=8, num_stages=3),
    GemvConfig(64, 512, kind="dot_w", num_stages=2),
    GemvConfig(64, 256, kind="dot_w", num_stages=4),
    GemvConfig(128, 128, kind="dot_w", num_warps=8, num_stages=4),
    GemvConfig(128, 256, kind="dot_w", num_warps=8, num_stages=3, split_k=2, serial_reduce=True),
    # FP8 weights, FP8 tensor cores (x quantized per token)
    *GEMV_DOT8_TUNED,
    GemvConfig(128, 128, split_k=4, kind="dot8", serial_reduce=True, num_stages=4),
    GemvConfig(64, 128, split_k=8, kind="dot8", serial_reduce=True, num_stages=4),
    GemvConfig(64, 256, split_k=8, kind="dot8", serial_reduce=True, num_stages=3),
    GemvConfig(128, 128, split_k=8, kind="dot8", serial_reduce=True, num_stages=4),
    # FMA at one row through shared memory
    *GEMV_FMA_PIPELINED,
)
"""Every tiling bench/gemv.py measures (``--all-configs`` prints each) and the GPU tests check."""
GEMV_CONFIGS = (
    GemvConfig(8, 256, num_warps=2, num_stages=4),
    GemvConfig(8, 512, num_stages=3),
    GemvConfig(128, 128, kind="dot_w"),
    GemvConfig(64, 256, kind="dot_w", num_stages=3),
    GemvConfig(64, 128, split_k=4, kind="dot_w", serial_reduce=True),
    GemvConfig(64, 256, split_k=2, kind="dot_w", serial_reduce=True, num_stages=3),
    # FP8 weights (one byte each): longer rows per iteration
    GemvConfig(8, 1024, num_stages=3),
    GemvConfig(128, 256, kind="dot_w", num_warps=8, num_stages=3),
    *GEMV_DOT8_TUNED,
    *GEMV_FMA_PIPELINED,
)
"""Tilings timed by :func:`tune_gemv` at start (each compiles once per bias/no-bias and row padding): the
winners of :data:`GEMV_CANDIDATES` on an H200 for the 7B shapes (bench/RESULTS.md, GEMV), few enough to keep
start-up short."""
GEMV_MIN_GAIN = 0.03
"""A tiling replaces cuBLAS only when it is at least this much faster (timing noise)."""

_gemv_plan: dict[tuple, GemvConfig] = {}
"""(N, K, row bucket, dtype, has bias, FP8 activations) → the tiling that beat cuBLAS; absent = cuBLAS."""
ARRIVAL_COUNTERS = 1 << 16
"""Arrival counters per (device, user) of :func:`arrival_counters`."""
_arrival_counters: dict[tuple[torch.device, str], torch.Tensor] = {}
"""Per device and user: zeroed arrival counters (each launch leaves them zero)."""


def gemv_bucket(m: int) -> int:
    """The tuned row count serving ``m`` rows (``m ≤`` :data:`GEMV_MAX_M`)."""
    return next(b for b in GEMV_BUCKETS if b >= m)


if triton is not None:

    @triton.jit
    def _gemv_load_w(w_rows, offs_k, k_hi, EVEN_K: tl.constexpr):
        """A [rows, BLOCK_K] weight tile, streamed past the caches (read once per forward)."""
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=(offs_k < k_hi)[None, :], other=0.0,
                        eviction_policy="evict_first")
        return w

    @triton.jit
    def _gemv_load_x(x_rows, offs_k, k_hi, EVEN_K: tl.constexpr):
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :])
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=(offs_k < k_hi)[None, :], other=0.0)
        return x

    @triton.jit
    def _gemv_finish(acc, pid_n, pid_k, offs_m, offs_n, M, N, b_ptr, s_ptr, stride_s, out_ptr, ws_ptr, cnt_ptr,
                     stride_om, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, SPLIT_K: tl.constexpr,
                     SERIAL: tl.constexpr):
        """Store ``acc [M_PAD, BLOCK_N]`` (fp32) times the weight scales (FP8 weights): the output (+ bias),
        or this split's partial; with SERIAL, the split arriving last for this row block sums all partials
        into the output."""
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + offs_n * stride_s, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]  # workspace [SPLIT_K, M, N], contiguous
            tl.store(ws + pid_k * M * N, acc, mask=mask)
            if SERIAL:
                tl.debug_barrier()  # every thread's partial is written before the release below
                arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLIT_K - 1:
                    total = tl.zeros_like(acc)
                    for s in tl.static_range(SPLIT_K):
                        total += tl.load(ws + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        total += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                             total.to(out_ptr.dtype.element_ty), mask=mask)
                    tl.store(cnt_ptr + pid_n, 0)

    @triton.jit(do_not_specialize=["M"])  # eager steps pass any row count: one compile per M_PAD
    def _gemv_fma_kernel(x_ptr, w_ptr, b_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split, stride_xm,
                         stride_wn, stride_s, stride_om, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                         M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SERIAL: tl.constexpr,
                         EVEN_K: tl.constexpr, LOOP_STAGES: tl.constexpr, PDL: tl.constexpr):
        pdl_release(PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, M_PAD)
        # rows past N (M) read row N-1 (M-1) instead of masking: the loads stay unmasked and 16-byte wide
        w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
        x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None] * stride_xm
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        # the first weight tile is read before waiting for x: weights never come from the previous kernel
        # (a split past K reads nothing: EVEN_K only when every split holds whole tiles of real columns)
        offs_k = tl.max_contiguous(tl.multiple_of(k_lo + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        w = _gemv_load_w(w_rows, offs_k, k_hi, EVEN_K)
        pdl_wait(PDL)
        x = _gemv_load_x(x_rows, offs_k, k_hi, EVEN_K)
        if M_PAD == 1:
            part = w.to(tl.float32) * x.to(tl.float32)
            # LOOP_STAGES > 1: the tiles stream through shared memory (cp.async), that many deep
            for k0 in tl.range(k_lo + BLOCK_K, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
                offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
                w = _gemv_load_w(w_rows, offs_k, k_hi, EVEN_K)
                x = _gemv_load_x(x_rows, offs_k, k_hi, EVEN_K)
                part += w.to(tl.float32) * x.to(tl.float32)
            acc = tl.sum(part, axis=1)[None, :]
        else:
            acc = tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
                offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
                w = _gemv_load_w(w_rows, offs_k, k_hi, EVEN_K)
                x = _gemv_load_x(x_rows, offs_k, k_hi, EVEN_K)
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        _gemv_finish(acc, pid_n, pid_k, offs_m, offs_n, M, N, b_ptr, s_ptr, stride_s, out_ptr, ws_ptr, cnt_ptr,
                     stride_om, HAS_BIAS, HAS_SCALE, SPLIT_K, SERIAL)

    @triton.jit(do_not_specialize=["M"])  # eager steps pass any row count: one compile per M_PAD
    def _gemv_dot_kernel(x_ptr, w_ptr, b_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, xs_ptr, M, N, K, k_per_split,
                         stride_xm, stride_wn, stride_s, stride_om, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                         M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SERIAL: tl.constexpr,
                         EVEN_K: tl.constexpr, SWAP: tl.constexpr, X_FP8: tl.constexpr, ONE_ROW: tl.constexpr,
                         PDL: tl.constexpr):
        """``tl.dot`` tiles; with X_FP8, x is E4M3 with per-row scales ``xs`` and the weight too (FP8 MMA); with
        ONE_ROW (M = 1), x's one row is read once and the padding rows are register copies of it."""
        pdl_begin(PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, M_PAD)
        w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
        if ONE_ROW:
            x_rows = x_ptr + tl.zeros([1, 1], dtype=tl.int32)
        else:
            x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None] * stride_xm  # rows ≥ M: copies, never stored
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if SWAP:
            acc_t = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
        else:
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
            w = _gemv_load_w(w_rows, offs_k, k_hi, EVEN_K)
            if not X_FP8:
                w = w.to(x_ptr.dtype.element_ty)  # FP8 weights with 16-bit x: converted in registers
            x = _gemv_load_x(x_rows, offs_k, k_hi, EVEN_K)
            if ONE_ROW:
                x = tl.broadcast_to(x, [M_PAD, BLOCK_K])
            if SWAP:
                acc_t += tl.dot(w, tl.trans(x))
            else:
                acc += tl.dot(x, tl.trans(w))
        if SWAP:
            acc = tl.trans(acc_t)
        if X_FP8:
            acc = acc * tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        _gemv_finish(acc, pid_n, pid_k, offs_m, offs_n, M, N, b_ptr, s_ptr, stride_s, out_ptr, ws_ptr, cnt_ptr,
                     stride_om, HAS_BIAS, HAS_SCALE, SPLIT_K, SERIAL)

    @triton.jit(do_not_specialize=["M"])  # eager steps pass any row count: one compile per M_PAD
    def _splitk_reduce_kernel(ws_ptr, b_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr,
                              SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_begin(PDL)
        m = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def arrival_counters(device: torch.device, groups: int, user: str) -> torch.Tensor:
    """Zeroed int32 counters, one per group of programs, for kernels in which the last program of a group to
    finish (an atomic count) combines the group's partial results and sets its counter back to zero — so a
    captured CUDA graph replays correctly. One buffer per device and ``user`` (``"gemv"``, ``"paged_decode"``),
    allocated on first use, which must precede graph capture."""
    if groups > ARRIVAL_COUNTERS:
        raise ValueError(f"{user}: at most {ARRIVAL_COUNTERS} groups of programs reduce serially, got {groups}")
    counters = _arrival_counters.get((device, user))
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{user}: run a serially reduced launch once before CUDA-graph capture")
        counters = _arrival_counters[(device, user)] = torch.zeros(ARRIVAL_COUNTERS, dtype=torch.int32, device=device)
    return counters


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig = GEMV_DEFAULT, scale: torch.Tensor | None = None,
         input_scale: torch.Tensor | None = None,
         x_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x [..., K]`` of at most ``config.max_m`` rows and ``weight [N, K]``
    (unit column stride) with the Triton kernel: fp32 accumulation, one rounding. ``weight`` has ``x``'s
    dtype, or is FP8 (E4M3) with ``scale`` (``[N, 1]`` per output channel or ``[1]`` per tensor, float32):
    ``x @ (weight * scale).T`` with activations as they are (weight-only dequantization, read at one byte
    per weight) — or, with a ``"dot8"`` tiling, with x quantized to E4M3 first, per token or by the static
    ``input_scale`` (the numbers of an FP8 Linear's ``_scaled_mm``), or taken as given by ``x_rows`` (per-token
    ``(q, scale)`` of ``x``, :func:`fp8_rows`)."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    fp8 = weight.dtype == FP8_DTYPE
    x_fp8 = config.kind == "dot8"
    if not 0 < m <= config.max_m or weight.stride(-1) != 1 or (x.dtype != weight.dtype and not fp8) \
            or fp8 != (scale is not None) or (x_fp8 and not fp8):
        raise ValueError(f"gemv takes 1 to {config.max_m} rows and a weight of the input's dtype (or FP8 with a scale; "
                         f"FP8 only for {config.kind!r}) with unit column stride, got {m} rows, {x.dtype} input, "
                         f"{weight.dtype} weight")
    split = config.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    grid = (triton.cdiv(n, config.block_n), split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    xs = out  # never read unless x is quantized
    if x_fp8:
        x2, xs = x_rows if x_rows is not None else quantize_rows_fp8(x2, input_scale, FP8_MIN_SCALE)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    serial = split > 1 and config.serial_reduce
    counters = arrival_counters(x.device, grid[0], "gemv") if serial else out
    b = bias if bias is not None else weight  # never read without HAS_BIAS
    scales = scale.reshape(-1) if fp8 else out  # never read without HAS_SCALE
    pdl = pdl_options(x.device, m)
    common = dict(HAS_BIAS=bias is not None, HAS_SCALE=fp8, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split,
                  SERIAL=serial, EVEN_K=k == k_per_split * split, num_warps=config.num_warps,
                  num_stages=config.num_stages, **pdl)
    args = (x2, weight, b, scales, out, ws, counters)
    sizes = (m, n, k, k_per_split, x2.stride(0), weight.stride(0), scales.stride(0) if fp8 and scales.numel() > 1 else 0,
             out.stride(0))
    if config.kind == "fma":
        _gemv_fma_kernel[grid](*args, *sizes, M_PAD=triton.next_power_of_2(m),
                               LOOP_STAGES=config.num_stages if config.pipelined else 1, **common)
    else:
        _gemv_dot_kernel[grid](*args, xs, *sizes, M_PAD=max(16, triton.next_power_of_2(m)),
                               SWAP=config.kind in ("dot_w", "dot8"), X_FP8=x_fp8, ONE_ROW=m == 1, **common)
    if split > 1 and not serial:
        _splitk_reduce_kernel[(triton.cdiv(n, 1024), m)](ws, b, out, m, n, out.stride(0), HAS_BIAS=bias is not None,
                                                         SPLIT_K=split, BLOCK=1024, **pdl)
    return out.view(*x.shape[:-1], n)


def _plan_key(layer: nn.Module, m: int) -> tuple:
    w = layer.weight
    return (w.shape[0], w.shape[1], gemv_bucket(m), w.dtype, layer.bias is not None, _fp8_activations(layer),
            _takes_fp8_rows(layer))


def _gemv_scale(layer: nn.Module) -> torch.Tensor | None:
    """The weight scales of an FP8 Linear (:class:`~telechat.model.fp8.Fp8Linear`), else None."""
    return getattr(layer, "weight_scale", None) if layer.weight.dtype == FP8_DTYPE else None


def _fp8_activations(layer: nn.Module) -> bool:
    """Whether the layer is an FP8 Linear that quantizes its activations (dynamic or static), so a
    ``"dot8"`` tiling computes its own numbers."""
    return _gemv_scale(layer) is not None and getattr(layer, "activations", None) is not None


def _takes_fp8_rows(layer: nn.Module) -> bool:
    """Whether the layer is an FP8 Linear with dynamic activations whose input comes with its FP8 rows
    (``fp8_rows_in``, set by :meth:`~telechat.model.modeling.TelechatBlock.fuse_fp8_quantization`)."""
    return getattr(layer, "fp8_rows_in", False) and getattr(layer, "activations", None) == "dynamic"


def fp8_rows_wanted(layer: nn.Module, m: int) -> bool:
    """Whether ``linear(x, layer)`` over ``m`` rows would use FP8 rows carried by ``x``: the layer takes them
    (:func:`_takes_fp8_rows`) and computes with x quantized — ``_scaled_mm``, or a ``dot8`` GEMV tiling — rather
    than with x as it is (the weight-only GEMV tilings the tuner picks at one row)."""
    if not _takes_fp8_rows(layer):
        return False
    config = _gemv_plan.get(_plan_key(layer, m)) if 0 < m <= GEMV_MAX_M else None
    return config is None or config.kind == "dot8"


def _layer_gemv(x: torch.Tensor, layer: nn.Module, config: GemvConfig,
                x_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    return gemv(x, layer.weight, layer.bias, config, _gemv_scale(layer), getattr(layer, "input_scale", None), x_rows)


def _gemv_able(layer: nn.Module) -> bool:
    """A dense Linear, or an FP8 Linear with its weight scales, whose weight the GEMV can read."""
    return type(layer) is nn.Linear or (getattr(layer, "weight", None) is not None and _gemv_scale(layer) is not None)


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(x)``; a dense or FP8 Linear with few rows goes through the Triton GEMV where
    :func:`tune_gemv` found it faster for this shape (CUDA inference only). An FP8 Linear with dynamic
    activations uses the FP8 rows ``x`` carries (:func:`fp8_rows`) instead of quantizing ``x`` again."""
    rows = fp8_rows(x) if getattr(layer, "activations", None) == "dynamic" else None
    if _gemv_plan and _use_triton(x) and _gemv_able(layer):
        m = x.numel() // x.shape[-1]
        if 0 < m <= GEMV_MAX_M:
            config = _gemv_plan.get(_plan_key(layer, m))
            if config is not None:
                return _layer_gemv(x, layer, config, rows)
    if rows is not None:
        return layer(x, x_rows=rows)
    return layer(x)


def time_per_call(fn, calls: int, reps: int = 7, graph: bool = False) -> float:
    """Median seconds per call of ``fn`` (which makes ``calls`` calls), by CUDA events after one warm-up;
    with ``graph``, of replays of ``fn`` captured in a CUDA graph (no launch overhead, as in decode)."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def tune_gemv(model: nn.Module, batch_sizes=GEMV_BUCKETS, configs=GEMV_CONFIGS) -> list[dict]:
    """Time cuBLAS (or the FP8 layer's own GEMM) and every Triton tiling on each dense bf16/fp16 or FP8
    Linear shape of ``model`` at each row bucket up to ``max(batch_sizes)``, and let :func:`linear` use
    the winners.

    Each shape is timed over all of the model's layers of that shape in turn, so the weights come
    from HBM as in a real forward, not from L2, and replayed from a CUDA graph, as decode steps run. A
    tiling whose result differs from cuBLAS (checked after the timed replays) is skipped. Returns one
    row per (shape, rows): times in µs and the choice. CUDA only; no-op elsewhere.
    """
    if triton is None or not torch.cuda.is_available():
        return []
    groups: dict[tuple, list[nn.Linear]] = defaultdict(list)
    for module in model.modules():
        w = module.weight if _gemv_able(module) else None
        if w is not None and w.is_cuda and w.dtype in (torch.bfloat16, torch.float16, FP8_DTYPE) and w.stride(-1) == 1:
            groups[(*w.shape, w.dtype, module.bias is not None, _fp8_activations(module),
                    _takes_fp8_rows(module))].append(module)
    buckets = sorted({gemv_bucket(b) for b in batch_sizes if b <= GEMV_MAX_M})
    t0 = time.perf_counter()
    rows = []
    for (n, k, dtype, _, x_fp8, given_rows), layers in groups.items():
        scale = _gemv_scale(layers[0])
        act = dtype if scale is None else next(model.parameters()).dtype  # FP8 weights are buffers
        # FP8: the GEMV dequantizes weights only; its reference is the dequantized weight times x
        w0 = layers[0].weight if scale is None else (layers[0].weight.float() * scale).to(act)
        for m in buckets:
            x = torch.randn(m, k, dtype=act, device=layers[0].weight.device)
            ref = F.linear(x, w0, layers[0].bias).float()
            ref_x_fp8 = layers[0](x).float() if x_fp8 else None  # the layer's own FP8 GEMM: x quantized too
            # an input that comes with its FP8 rows (from the norm before it): neither path quantizes it
            x_rows = quantize_rows_fp8(x, None, FP8_MIN_SCALE) if given_rows else None
            own = {"x_rows": x_rows} if given_rows else {}
            cublas = time_per_call(lambda: [lyr(x, **own) for lyr in layers], len(layers), graph=True)
            best, best_t = None, cublas * (1 - GEMV_MIN_GAIN)
            for config in configs:
                if m > config.max_m or (config.kind == "dot8" and not x_fp8):
                    continue
                try:
                    t = time_per_call(lambda: [_layer_gemv(x, lyr, config, x_rows) for lyr in layers], len(layers),
                                      graph=True)
                    out = _layer_gemv(x, layers[0], config, x_rows).float()
                    want = ref_x_fp8 if config.kind == "dot8" else ref
                    if not torch.allclose(out, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                        log.warning("GEMV tiling %s gives wrong results for %dx%d; skipped", config, n, k)
                        continue
                except Exception:  # noqa: BLE001 - a tiling that does not compile here is not a choice
                    log.warning("GEMV tiling %s failed for %dx%d", config, n, k, exc_info=True)
                    continue
                if t < best_t:
                    best, best_t = config, t
            key = _plan_key(layers[0], m)
            if best is None:
                _gemv_plan.pop(key, None)
            else:
                _gemv_plan[key] = best
            rows.append({"n": n, "k": k, "m": m, "cublas_us": cublas * 1e6,
                         "triton_us": best_t * 1e6 if best else None, "config": best})
    log.info("GEMV tuned in %.1f s: Triton for %d of %d (shape, rows) cases", time.perf_counter() - t0,
             sum(r["config"] is not None for r in rows), len(rows))
    return rows
