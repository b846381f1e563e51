"""Attention kernels: flash-attn when importable (CUDA, fp16/bf16), PyTorch SDPA otherwise.

The choice is made once per process and logged once. Shapes follow SDPA: ``[B, heads, T, d]``.

On CUDA, SDPA never runs cuDNN's attention here: cuDNN builds an execution plan for every new shape, and
a server meets a new shape with nearly every prompt length and batch of prompts. Measured on an H200
(bench/RESULTS.md, "Attention without cuDNN plans"): a cached-history chat turn whose context length was
new took 60 ms to its first token against 18 ms for a fresh prompt of a length already seen, and 16
prompts of assorted lengths waited 0.3 s. Causal attention goes through PyTorch's causal bias (its flash
or memory-efficient kernel, no mask tensor); other masks run with the cuDNN backend turned off.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)

_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA backends for a masked attention on CUDA: every one but cuDNN (see the module doc)."""


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
    if causal and (q.is_cuda or tq != tk):
        bias = causal_lower_right(tq, tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, enable_gqa=gqa)
    if q.is_cuda and mask is not None:
        with sdpa_kernel(_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                          enable_gqa=gqa)
