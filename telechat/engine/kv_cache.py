"""Paged KV cache: fixed-size blocks pre-allocated from a memory budget, a free list, and the
attention context that reads/writes it during one engine step.

Layout per layer: ``k[layer], v[layer]: [num_blocks * block_size, n_kv, head_dim]`` (a flat slot
array; slot = block * block_size + offset). A sequence owns a list of blocks (its block table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from telechat.model.attention import attention
from telechat.engine.paged_attention import paged_decode_attention
from telechat.model.kernels import rope_and_cache
from telechat.model.rope import apply_rope


class BlockAllocator:
    """Free list of KV blocks. Allocation never exceeds the budget fixed at start."""

    def __init__(self, num_blocks: int, reserved: int = 1):
        self.num_blocks = num_blocks - reserved  # usable blocks; the first `reserved` are scratch space
        self._free = list(range(num_blocks - 1, reserved - 1, -1))

    @property
    def free(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks; raises ``MemoryError`` when fewer are free (callers check first)."""
        if n > len(self._free):
            raise MemoryError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        """Return blocks to the free list."""
        self._free.extend(reversed(blocks))


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

    def slots(self, blocks: list[int], start: int, end: int, device: torch.device | str) -> torch.Tensor:
        """Flat slot indices of token positions ``[start, end)`` of a sequence with these blocks."""
        pos = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(device)


@dataclass
class PrefillChunk:
    """Tokens ``[start, end)`` of one sequence computed in this step, at rows ``[row, row+end-start)``."""

    row: int
    start: int
    end: int
    context_slots: torch.Tensor  # slots of positions [0, end)


@dataclass
class StepAttention:
    """Attention metadata for one engine step over a flat batch of tokens.

    Passed to the model as its cache object: :class:`~telechat.model.modeling.TelechatAttention` calls
    :meth:`attend` with the step's q/k/v (``[T, heads, d]``, RoPE applied). The first
    ``decode_rows`` tokens are single-token decodes (one per sequence), the rest prefill chunks.
    """

    cache: PagedKVCache
    write_slots: torch.Tensor  # [T] slot of every token of the step
    decode_rows: int
    block_tables: torch.Tensor | None  # [S, max_blocks] int32, decoding sequences
    seq_lens: torch.Tensor | None  # [S] int32, context length including the new token
    partition: int
    prefills: list[PrefillChunk]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate q/k (``[T, heads, d]``), store k/v in the paged cache, attend each token to its
        sequence's past."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if self.decode_rows and not self.prefills:
            q = rope_and_cache(q, k, v, cos, sin, kc, vc, self.write_slots)
            return paged_decode_attention(q, kc, vc, self.block_tables, self.seq_lens, self.cache.block_size,
                                          self.partition)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        kc[self.write_slots] = k
        vc[self.write_slots] = v
        out = torch.empty_like(q)
        if self.decode_rows:
            s = self.decode_rows
            out[:s] = paged_decode_attention(q[:s], kc, vc, self.block_tables, self.seq_lens,
                                             self.cache.block_size, self.partition)
        for c in self.prefills:
            rows = slice(c.row, c.row + c.end - c.start)
            qc = q[rows].transpose(0, 1).unsqueeze(0)  # (1, N, C, d)
            if c.start == 0:
                kk, vv = k[rows], v[rows]
                o = attention(qc, kk.transpose(0, 1).unsqueeze(0), vv.transpose(0, 1).unsqueeze(0), causal=True)
            else:
                kk = kc[c.context_slots].transpose(0, 1).unsqueeze(0)  # (1, n_kv, end, d)
                vv = vc[c.context_slots].transpose(0, 1).unsqueeze(0)
                qpos = torch.arange(c.start, c.end, device=q.device)
                mask = (torch.arange(c.end, device=q.device)[None, :] <= qpos[:, None])[None, None]
                o = attention(qc, kk, vv, mask=mask)
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out
