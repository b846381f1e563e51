"""Prefill chunks that continue cached context, attended straight from the paged KV cache (CUDA, Triton).

A chunk of ``n`` new tokens at positions ``[start, end)`` attends to its sequence's positions ``[0, end)``,
causally: the context (earlier chunks, or blocks shared through the prefix cache) and its own new keys,
which the step has already written to the cache. The gather path (:meth:`StepAttention.attend` without
Triton, and for long chunks) copies every chunk's keys and values out of the cache into contiguous tensors
and runs SDPA per group of equal spans: for 16 chat sessions continuing 4.4k-token histories that is 1.1 GB copied and read again per
layer, and one call per distinct span. Here one launch per layer covers every such chunk of the step (the
short ones: :data:`telechat.engine.kv_cache.PREFIX_KERNEL_TOKENS`): each
program holds a block of one chunk's queries for one head and streams that sequence's keys and values
from their cache slots with an online softmax (flash attention over a slot list), so the cache is read
once and nothing is copied. When the step's chunks, query blocks and heads make too few programs to fill
the card (a chat turn or two arriving while others decode), each context is also split into partitions read
by programs of their own and merged with a log-sum-exp reduction, as in the decode kernel: on an H200, one to
four chunks of 48 tokens over 4.4k cached positions take 54-174 µs per layer this way against 192-225 µs with
one program looping over each whole context (bench/RESULTS.md, "prefix kernel split").

The cache may hold FP8 (E4M3) values (``stored = value / scale``): K's scale is folded into the softmax
scale and V's applied to the output, as in the decode kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from telechat.engine.paged_attention import MAX_PARTITIONS
from telechat.engine.sampling import to_device

try:  # Triton ships with CUDA builds of torch; CPU installs use the gather path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

TARGET_PROGRAMS = 256
"""Programs a launch aims to have (about 2 per SM of a 132-SM card): a step whose chunks, query blocks and heads
give fewer splits each context over more programs (:func:`context_partitions`). Measured on an H200 (7B heads,
4.4k-token contexts, bf16 and FP8 caches): the best of 128-2048 for one to four chunks of 48 tokens; a target
of 512 or more split steps of 8-16 chunks that ran faster whole (each partition also costs a store of its
partial results and the merge)."""
MERGE_TOKENS = 32
"""Queries per program of the merge of partitions (a [32, head dim] fp32 accumulator: 32 registers per thread at
head dim 128). With one program per query and head, a split step's extra time on an H200 grew by ≈ 9 ns per
(query, head), more than the split saved once a step had 8 chunks (bench/RESULTS.md)."""
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

    @triton.jit(do_not_specialize=["stride_sc", "num_parts", "part_len", "max_tokens"])
    def _prefix_prefill_kernel(
        q_ptr, k_ptr, v_ptr, meta_ptr, slots_ptr, out_ptr, acc_ptr, stats_ptr, qk_scale, v_scale,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh, stride_sc,
        num_parts, part_len, max_tokens, num_heads,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
    ):
        c = tl.program_id(0)
        mb = tl.program_id(1)
        h = tl.program_id(2) // num_parts
        part = tl.program_id(2) % num_parts
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
            lo = part * part_len  # this program's share of them: [lo, lo + part_len)
            hi = tl.minimum(hi, lo + part_len)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
            for p0 in range(lo, hi, BLOCK_N):
                offs_p = p0 + tl.arange(0, BLOCK_N)
                p_mask = offs_p < hi
                slot = tl.load(slots_ptr + c * stride_sc + offs_p, mask=p_mask, other=0)
                kv_off = slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
                kv_mask = p_mask[:, None] & d_mask[None, :]
                k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                seen = (offs_p[None, :] <= pos[:, None]) & p_mask[None, :]
                s = tl.where(seen, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                # a query that sees none of the keys so far (a later partition starts past it) keeps m = -inf
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
            acc = acc * v_scale
            if DIRECT:  # one partition: this program holds the whole softmax (key 0 is in it: l > 0)
                tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                         (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
            else:  # partial results, merged by _prefix_merge_kernel; an empty share stores m = -inf, l = 0
                part_rows = ((c * max_tokens + offs_m) * num_heads + h) * num_parts + part
                tl.store(acc_ptr + part_rows[:, None] * D_PAD + offs_d[None, :], acc, mask=m_mask[:, None])
                tl.store(stats_ptr + part_rows * 2, m_i, mask=m_mask)
                tl.store(stats_ptr + part_rows * 2 + 1, l_i, mask=m_mask)

    @triton.jit(do_not_specialize=["num_parts", "max_tokens"])
    def _prefix_merge_kernel(acc_ptr, stats_ptr, meta_ptr, out_ptr, stride_ot, stride_oh, num_parts, max_tokens,
                             num_heads, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
        """One chunk's block of ``BLOCK_T`` queries for one head: its partitions' partial results folded in
        order with a running log-sum-exp (an empty share, m = -inf and l = 0, weighs nothing)."""
        c = tl.program_id(0)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(2)
        n = tl.load(meta_ptr + c * 3 + 2)
        if tl.program_id(1) * BLOCK_T < n:
            t_mask = offs_t < n
            offs_d = tl.arange(0, D_PAD)
            first = ((c * max_tokens + offs_t) * num_heads + h) * num_parts
            m = tl.full([BLOCK_T], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_T], dtype=tl.float32)
            acc = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
            for part in range(num_parts):
                m_p = tl.load(stats_ptr + (first + part) * 2, mask=t_mask, other=float("-inf"))
                l_p = tl.load(stats_ptr + (first + part) * 2 + 1, mask=t_mask, other=0.0)
                a_p = tl.load(acc_ptr + (first + part)[:, None] * D_PAD + offs_d[None, :], mask=t_mask[:, None],
                              other=0.0)
                m_new = tl.maximum(m, m_p)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha, beta = tl.exp(m - m_safe), tl.exp(m_p - m_safe)
                acc = acc * alpha[:, None] + a_p * beta[:, None]
                l = l * alpha + l_p * beta
                m = m_new
            rows = (tl.load(meta_ptr + c * 3) + offs_t).to(tl.int64)
            tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                     (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & (offs_d < HEAD_DIM)[None, :])


def query_block(head_dim: int, element_size: int) -> int:
    """Queries (and keys) a program takes per iteration for a head of ``head_dim`` values of ``element_size``
    bytes: 64, or 32 for rows wider than :data:`TILE_BYTES` once padded to a power of two."""
    return 64 if max(16, triton.next_power_of_2(head_dim)) * element_size <= TILE_BYTES else 32


def context_partitions(programs: int, max_end: int, block: int, target_programs: int = TARGET_PROGRAMS
                       ) -> tuple[int, int]:
    """``(partitions, keys per partition)`` of a launch with ``programs`` programs per partition over contexts of
    at most ``max_end`` positions: one partition when that already reaches ``target_programs``, else the
    context split evenly into whole blocks of ``block`` keys, up to
    :data:`~telechat.engine.paged_attention.MAX_PARTITIONS`, so a few chunks over a long history are read by
    many programs at once instead of each program looping over all of it. No partition of the longest context
    is empty."""
    parts = 1 if programs >= target_programs else min(MAX_PARTITIONS, target_programs // programs,
                                                        math.ceil(max_end / block))
    part_len = math.ceil(math.ceil(max_end / parts) / block) * block
    return math.ceil(max_end / part_len), part_len


def prefix_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: ChunkTables,
                             out: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                             target_programs: int = TARGET_PROGRAMS) -> None:
    """Write into ``out [T, Hq, d]`` the attention of every context chunk's rows of ``q [T, Hq, d]`` (rotated)
    over its sequence's cached positions ``[0, end)``, causally. ``k_cache, v_cache``: ``[slots, Hkv, d]`` in
    ``q``'s dtype or FP8 (stored divided by the scales). Other rows of ``out`` are left as they are.
    ``target_programs``: see :func:`context_partitions`. Triton only (CUDA, or its interpreter)."""
    _, heads, d = q.shape
    d_pad = max(16, triton.next_power_of_2(d))
    block = query_block(d, q.element_size())
    chunks, m_blocks = tables.meta.shape[0], triton.cdiv(tables.max_tokens, block)
    parts, part_len = context_partitions(chunks * m_blocks * heads, tables.slots.shape[1], block, target_programs)
    direct = parts == 1
    rows = chunks * tables.max_tokens * heads * parts
    acc = out if direct else torch.empty(rows, d_pad, dtype=torch.float32, device=q.device)
    stats = out if direct else torch.empty(rows, 2, dtype=torch.float32, device=q.device)
    _prefix_prefill_kernel[(chunks, m_blocks, heads * parts)](
        q, k_cache, v_cache, tables.meta, tables.slots, out, acc, stats, float(k_scale) / math.sqrt(d), float(v_scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        tables.slots.stride(0), parts, part_len, tables.max_tokens, heads,
        GROUP=heads // k_cache.shape[1], HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block, BLOCK_N=block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DIRECT=direct, num_warps=4, num_stages=2,
    )
    if not direct:
        _prefix_merge_kernel[(chunks, triton.cdiv(tables.max_tokens, MERGE_TOKENS), heads)](
            acc, stats, tables.meta, out, out.stride(0), out.stride(1), parts, tables.max_tokens, heads,
            HEAD_DIM=d, D_PAD=d_pad, BLOCK_T=MERGE_TOKENS,
        )
