"""Rotary position embeddings with TeleChat's NTK-aware base and attention scaling (docs/model.md, RoPE).

For a forward chunk of length ``L`` the official model uses ``L_eff = max(L, training_seqlen)``,
an NTK factor ``alpha = max(1, 2**ceil(log2(L_eff / base_seqlen) + 1) - 1)``, a rotary base
``theta * alpha ** (d / (d - 2))`` and, past the training length, multiplies cos and sin by
``mscale = 1 + 0.1 * ln(L_eff / training_seqlen)`` (so attention logits grow by ``mscale**2``).

The official code re-derives these per chunk, which breaks cached decoding (every 1-token decode
step falls back to ``training_seqlen``). Here the parameters are chosen once per sequence, from
its prompt length at prefill, and kept for every later position: the KV cache stays consistent
and decoding past ``training_seqlen`` is valid (docs/model.md, RoPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from telechat.model.config import ROPE_MODES


@dataclass(frozen=True)
class RopeParams:
    """Rotary parameters fixed for one sequence: NTK ``alpha``, effective ``base`` and ``mscale``."""

    alpha: float
    base: float
    mscale: float


def ntk_alpha(effective_length: int, base_seqlen: int) -> int:
    """NTK factor of the official formula: 1 up to ``base_seqlen``, then 3 (up to 2×), 7 (4×), 15 (8×), ..."""
    # math.log(x, 2) as the reference computes it, so exact powers of two round the same way.
    alpha = 2 ** math.ceil(math.log(effective_length / base_seqlen, 2) + 1) - 1
    return max(alpha, 1)


def rope_params(
    length: int,
    *,
    head_dim: int,
    training_seqlen: int,
    base_seqlen: int,
    theta: float = 10000.0,
    mode: str = "ntk+scaling",
) -> RopeParams:
    """Rotary parameters for a sequence whose prefill chunk has ``length`` tokens.

    ``mode`` is ``none`` (plain RoPE), ``ntk`` (NTK base only) or ``ntk+scaling`` (official).
    """
    effective = max(int(length), training_seqlen)
    if mode == "none":
        return RopeParams(1.0, float(theta), 1.0)
    alpha = ntk_alpha(effective, base_seqlen)
    base = theta * alpha ** (head_dim / (head_dim - 2))
    mscale = 1.0
    if mode == "ntk+scaling" and effective > training_seqlen:
        mscale = 1.0 + 0.1 * math.log(effective / training_seqlen)
    elif mode not in ROPE_MODES:
        raise ValueError(f"unknown RoPE mode {mode!r}")
    return RopeParams(float(alpha), float(base), float(mscale))


@lru_cache(maxsize=64)
def _inv_freq_cpu(base: float, head_dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def inv_freq(base: float, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``base ** (-2j / d)`` for ``j < d/2`` in float32 (cached per base and width)."""
    return _inv_freq_cpu(base, head_dim).to(device)


def cos_sin(
    positions: torch.Tensor, freqs: torch.Tensor, mscale: float | torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape ``positions.shape + (d,)``, scaled by ``mscale``, cast to ``dtype``.

    ``freqs`` is ``[d/2]`` (one sequence) or ``positions.shape + (d/2,)`` (per-token bases, as the
    engine batches sequences with different NTK factors). Computed in float32 like the reference.
    """
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # [..., d/2]
    emb = torch.cat((angles, angles), dim=-1)  # [..., d]
    if isinstance(mscale, torch.Tensor):
        mscale = mscale.unsqueeze(-1)
    return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX rotation: ``concat(-x[d/2:], x[:d/2])``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[..., d]``) by tables broadcastable to it."""
    return x * cos + rotate_half(x) * sin
