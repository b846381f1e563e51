"""The model's serving seam: one flat batch of tokens from many sequences (docs/engine.md, The model seam).

:meth:`TelechatForCausalLM.forward_batch <telechat.model.modeling.TelechatForCausalLM.forward_batch>`
takes flat input ids ``[T]`` and a :class:`ForwardBatch`: where each token sits (position, RoPE
frequencies and ``mscale`` of its sequence), who does attention, and which rows need logits. The
model runs its own layer loop; each attention layer hands its projections to
``batch.attention.attend``. The paged implementation lives in the engine
(:class:`telechat.engine.kv_cache.StepAttention`); :class:`CausalAttention` is the plain reference
for one sequence without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from telechat.model.attention import attention
from telechat.model.rope import apply_rope, cos_sin

if TYPE_CHECKING:
    from telechat.model.lora import LoraBatch


class AttentionBackend(Protocol):
    """What an attention layer calls during :meth:`forward_batch`."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output ``[T, Hq, d]`` of layer ``layer`` for unrotated ``q [T, Hq, d]`` and
        ``k, v [T, Hkv, d]``; ``cos, sin [T, d]`` rotate q and k (NeoX, ``mscale`` included)."""
        ...


@dataclass
class ForwardBatch:
    """Everything besides the input ids that one serving forward needs (tensors on the model's device)."""

    positions: torch.Tensor
    """``[T]`` int64: each token's position in its own sequence."""
    inv_freq: torch.Tensor
    """``[T, d/2]`` float32: RoPE inverse frequencies of each token's sequence (its NTK base)."""
    mscale: torch.Tensor
    """``[T]`` float32: RoPE attention scale of each token's sequence."""
    attention: AttentionBackend
    """Does the attention of every layer (and owns the KV cache, if any)."""
    logits_rows: torch.Tensor | None = None
    """``[R]`` int64: the tokens whose logits are returned, in this order; None = every token."""
    lora: LoraBatch | None = None
    """Per-request LoRA adapters of the tokens (:mod:`telechat.model.lora`); None = the base model only."""

    def rope_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, d]`` of every token, computed in float32 and cast to ``dtype``."""
        return cos_sin(self.positions, self.inv_freq, self.mscale, dtype)


class CausalAttention:
    """Reference backend: the batch is one fresh sequence, attended causally, nothing cached."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, T, d)
        return attention(q, k, v, causal=True).squeeze(0).transpose(0, 1)
