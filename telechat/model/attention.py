"""Attention kernels: flash-attn when importable (CUDA, fp16/bf16), PyTorch SDPA otherwise.

The choice is made once per process and logged once. Shapes follow SDPA: ``[B, heads, T, d]``.

On CUDA, SDPA never runs cuDNN's attention here: cuDNN builds an execution plan for every new shape, and
a server meets a new shape with nearly every prompt length and batch of prompts. Measured on an H200
(bench/RESULTS.md, "Attention without cuDNN plans"): a cached-history chat turn whose context length was
new took 60 ms to its first token against 18 ms for a fresh prompt of a length already seen, and fresh
prompts of assorted lengths under 16 chat sessions waited 0.30 s for their first token (0.14 s without).
SDPA runs with the cuDNN backend turned off for the call (the flag is process-wide: PyTorch's
``sdpa_kernel`` context costs 17 us, flipping the flag 0.6 us, and a prefill step makes hundreds of
calls); a causal chunk after cached positions goes through PyTorch's causal bias (its flash or
memory-efficient kernel, no mask tensor).
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package is importable and CUDA is present."""
    available = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    log.info("attention backend: %s", "flash-attn (CUDA fp16/bf16), SDPA fallback" if available else "PyTorch SDPA")
    return available


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention over ``q [B, N, Tq, d]``, ``k, v [B, N_kv, Tk, d]``.

    ``mask`` is a boolean ``[B, 1, Tq, Tk]`` (True = attend). ``causal``: query ``i`` attends keys
    ``0 .. Tk - Tq + i`` — aligned at the bottom right, so ``Tq < Tk`` is a chunk continuing ``Tk - Tq``
    cached positions, and ``Tq == Tk`` the usual causal mask. Grouped-query heads are expanded by the kernel.
    """
    if causal and mask is not None:
        raise ValueError("attention takes a mask or causal, not both")
    use_flash = (
        mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and (causal or q.shape[2] == 1)
        and flash_attn_available()
    )
    if use_flash:
        from flash_attn import flash_attn_func

        out = flash_attn_func(  # its causal mask is aligned at the bottom right too
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=causal
        )
        return out.transpose(1, 2)
    gqa = k.shape[1] != q.shape[1]
    tq, tk = q.shape[2], k.shape[2]
    if causal and tq != tk:
        mask, causal = causal_lower_right(tq, tk), False
    return _sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=gqa)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on CUDA with the cuDNN backend off for the call (see the module doc)."""
    if not (q.is_cuda and torch.backends.cuda.cudnn_sdp_enabled()):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
