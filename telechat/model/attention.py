"""Attention kernels: flash-attn when importable (CUDA, fp16/bf16), PyTorch SDPA otherwise.

The choice is made once per process and logged once. Shapes follow SDPA: ``[B, heads, T, d]``.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache

import torch
import torch.nn.functional as F

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

    ``mask`` is a boolean ``[B, 1, Tq, Tk]`` (True = attend). ``causal`` means top-left aligned
    causal with ``Tq == Tk``. Grouped-query heads are expanded by the kernel.
    """
    use_flash = (
        mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and (causal or q.shape[2] == 1)
        and flash_attn_available()
    )
    if use_flash:
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=causal
        )
        return out.transpose(1, 2)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None, enable_gqa=gqa
    )
