"""Prefill chunks that continue cached context, attended straight from the paged KV cache (CUDA, Triton).

A chunk of ``n`` new tokens at positions ``[start, end)`` attends to its sequence's positions ``[0, end)``,
causally: the context (earlier chunks, or blocks shared through the prefix cache) and its own new keys,
which the step has already written to the cache. The gather path (:meth:`StepAttention.attend` without
Triton, and for long chunks) copies every chunk's keys and values out of the cache into contiguous tensors and runs SDPA per group of
equal spans: for 16 chat sessions continuing 4.4k-token histories that is 1.1 GB copied and read again per
layer, and one call per distinct span. Here one launch per layer covers every such chunk of the step (the
short ones: :data:`telechat.engine.kv_cache.PREFIX_KERNEL_TOKENS`): each
program holds a block of one chunk's queries for one head and streams that sequence's keys and values
from their cache slots with an online softmax (flash attention over a slot list), so the cache is read
once and nothing is copied.

The cache may hold FP8 (E4M3) values (``stored = value / scale``): K's scale is folded into the softmax
scale and V's applied to the output, as in the decode kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from telechat.engine.sampling import to_device

try:  # Triton ships with CUDA builds of torch; CPU installs use the gather path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

TILE_BYTES = 256
"""Bytes of one head's row (head dim padded × element size) up to which a program takes 64 queries and 64
positions per iteration; wider rows (fp32, or the 12B's head dim 160 padded to 256) take 32 of each, so the
tiles stay within a Hopper SM's shared memory."""


class ChunkTables(NamedTuple):
    """The launch metadata of a step's context chunks, built once per step (:func:`chunk_tables`)."""

    meta: torch.Tensor
    """``[C, 3]`` int32: each chunk's first row in the step's flat batch, its start position, its token count."""
    slots: torch.Tensor
    """``[C, max end]`` int64: each chunk's cache slots of positions ``[0, end)``, padded with zeros."""
    max_tokens: int
    """The largest chunk's token count (sizes the grid without reading ``meta`` back)."""


def chunk_tables(chunks: Sequence, device: torch.device) -> ChunkTables:
    """:class:`ChunkTables` of context chunks (objects with ``row``, ``start``, ``end`` and ``context_slots``,
    the slots of positions ``[0, end)``, on ``device``), copied without waiting for the device's queued work."""
    meta = to_device([[c.row, c.start, c.end - c.start] for c in chunks], torch.int32, device)
    slots = pad_sequence([c.context_slots.to(device, torch.int64) for c in chunks], batch_first=True)
    return ChunkTables(meta, slots, max(c.end - c.start for c in chunks))


if triton is not None:

    @triton.jit(do_not_specialize=["stride_sc"])  # the padded context length varies by step: no compile per value
    def _prefix_prefill_kernel(
        q_ptr, k_ptr, v_ptr, meta_ptr, slots_ptr, out_ptr, qk_scale, v_scale,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh, stride_sc,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        c = tl.program_id(0)
        mb = tl.program_id(1)
        h = tl.program_id(2)
        row0 = tl.load(meta_ptr + c * 3)
        start = tl.load(meta_ptr + c * 3 + 1)
        n = tl.load(meta_ptr + c * 3 + 2)
        if mb * BLOCK_M < n:
            kvh = h // GROUP
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < n
            offs_d = tl.arange(0, D_PAD)
            d_mask = offs_d < HEAD_DIM
            rows = (row0 + offs_m).to(tl.int64)
            q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            pos = start + offs_m  # each query's own position: it sees keys 0 .. pos
            hi = start + tl.minimum(n, (mb + 1) * BLOCK_M)  # keys this block of queries can see
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
            for p0 in range(0, hi, BLOCK_N):
                offs_p = p0 + tl.arange(0, BLOCK_N)
                p_mask = offs_p < hi
                slot = tl.load(slots_ptr + c * stride_sc + offs_p, mask=p_mask, other=0)
                kv_off = slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
                kv_mask = p_mask[:, None] & d_mask[None, :]
                k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                seen = (offs_p[None, :] <= pos[:, None]) & p_mask[None, :]
                s = tl.where(seen, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in the first block
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
            out = acc * v_scale / l_i[:, None]
            tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefix_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: ChunkTables,
                             out: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write into ``out [T, Hq, d]`` the attention of every context chunk's rows of ``q [T, Hq, d]`` (rotated)
    over its sequence's cached positions ``[0, end)``, causally. ``k_cache, v_cache``: ``[slots, Hkv, d]`` in
    ``q``'s dtype or FP8 (stored divided by the scales). Other rows of ``out`` are left as they are. Triton
    only (CUDA, or its interpreter)."""
    _, heads, d = q.shape
    d_pad = max(16, triton.next_power_of_2(d))
    block = 64 if d_pad * q.element_size() <= TILE_BYTES else 32
    grid = (tables.meta.shape[0], triton.cdiv(tables.max_tokens, block), heads)
    _prefix_prefill_kernel[grid](
        q, k_cache, v_cache, tables.meta, tables.slots, out, float(k_scale) / math.sqrt(d), float(v_scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        tables.slots.stride(0),
        GROUP=heads // k_cache.shape[1], HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block, BLOCK_N=block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2,
    )
