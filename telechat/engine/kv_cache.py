"""Paged KV cache: fixed-size blocks pre-allocated from a memory budget (handed out by
:class:`~telechat.engine.block_pool.BlockPool`), and the attention backend that reads/writes it during one engine step.

Layout per layer: ``k[layer], v[layer]: [num_blocks * block_size, n_kv, head_dim]`` (a flat slot
array; slot = block * block_size + offset). A sequence owns a list of blocks (its block table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from telechat.model.attention import attention
from telechat.engine.paged_attention import paged_decode_attention
from telechat.model.kernels import rope_and_cache
from telechat.model.rope import apply_rope


class PagedKVCache:
    """The pre-allocated K and V tensors of every layer."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self.k = [torch.zeros(slots, n_kv, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(slots, n_kv, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """K + V bytes one token occupies across all layers."""
        return 2 * num_layers * n_kv * head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class PrefillChunk:
    """Positions ``[start, end)`` of one sequence, at rows ``[row, row + end - start)`` of the step's flat batch."""

    row: int
    start: int
    end: int
    context_slots: torch.Tensor | None = None
    """Slots of positions ``[0, end)`` when ``start > 0``: the chunk attends to context read from the cache
    (earlier chunks, or blocks shared through the prefix cache)."""


@dataclass
class StepAttention:
    """The paged-cache attention backend of one engine step (``ForwardBatch.attention``).

    The step's flat tokens are ``decode_rows`` single-token decodes (one per sequence) followed by
    prefill chunks. :meth:`attend` rotates q and k, writes k and v at ``write_slots`` of the layer's
    cache, and attends every token to its own sequence's past.
    """

    cache: PagedKVCache
    write_slots: torch.Tensor
    """``[T]`` int64: cache slot of every token of the step."""
    decode_rows: int
    block_tables: torch.Tensor | None
    """``[decode_rows, max_blocks]`` int32: block tables of the decoding sequences."""
    seq_lens: torch.Tensor | None
    """``[decode_rows]`` int32: context length of each decode, its new token included."""
    partition: int
    """Tokens per partition of the decode kernel (:func:`~telechat.engine.paged_attention.partition_size`)."""
    prefills: Sequence[PrefillChunk] = ()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output ``[T, Hq, d]`` for unrotated ``q [T, Hq, d]``, ``k, v [T, Hkv, d]``."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if not self.prefills:
            q = rope_and_cache(q, k, v, cos, sin, kc, vc, self.write_slots)
            return paged_decode_attention(q, kc, vc, self.block_tables, self.seq_lens, self.cache.block_size,
                                          self.partition)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        kc[self.write_slots] = k
        vc[self.write_slots] = v
        out = torch.empty_like(q)
        if self.decode_rows:
            n = self.decode_rows
            out[:n] = paged_decode_attention(q[:n], kc, vc, self.block_tables, self.seq_lens, self.cache.block_size,
                                             self.partition)
        for chunk in self.prefills:
            rows = slice(chunk.row, chunk.row + chunk.end - chunk.start)
            qc = q[rows].transpose(0, 1).unsqueeze(0)  # (1, Hq, C, d)
            if chunk.context_slots is None:  # a fresh sequence: its own keys, causal
                kk, vv = (t[rows].transpose(0, 1).unsqueeze(0) for t in (k, v))
                o = attention(qc, kk, vv, causal=True)
            else:
                kk, vv = (t[chunk.context_slots].transpose(0, 1).unsqueeze(0) for t in (kc, vc))  # (1, Hkv, end, d)
                qpos = torch.arange(chunk.start, chunk.end, device=q.device)
                mask = (torch.arange(chunk.end, device=q.device)[None, :] <= qpos[:, None])[None, None]
                o = attention(qc, kk, vv, mask=mask)
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out
