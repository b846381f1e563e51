"""Causal-LM loss in chunks: the LM head and cross-entropy run a few thousand tokens at a time, and
each chunk's logits are recomputed in backward instead of kept, so the ``[tokens, vocab]`` logits
(4 GB in float32 for 8k tokens of TeleChat's 160k vocabulary) never exist at once.

Same value and gradients as transformers' ``ForCausalLMLoss`` (shifted labels, -100 ignored, mean
over counted tokens or sum / ``num_items_in_batch``); the price is one more LM-head forward per
token in backward (2·hidden·vocab FLOPs, about 2 % of a 7B training step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE, reduction="sum")


def chunked_causal_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                           num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Loss of ``head(hidden [B, T, H])`` against ``labels [B, T]`` (shifted here), ``chunk_tokens`` at a time.

    ``head`` is called as a module (so ZeRO-3 / FSDP gather its weight as usual)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        h, y = flat[start:start + chunk_tokens], shifted[start:start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    if num_items_in_batch is None:
        return total / (shifted != IGNORE).sum().clamp(min=1)
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
