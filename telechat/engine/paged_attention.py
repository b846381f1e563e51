"""Decode attention over the paged KV cache.

One query token per sequence attends to its own ``seq_len`` cached tokens, found through its
block table. On CUDA a Triton kernel reads only the live KV: the grid has a fixed number of
partitions per (sequence, head), chosen from the batch size so the GPU has enough programs in
flight (many for one sequence, one for large batches), and each sequence splits its *own* context
evenly over them at run time, so a short context is read by several programs in one pass instead
of one program looping, and a long one still fills the card. With one partition the kernel writes
the output itself; otherwise the partitions are merged with a log-sum-exp reduction by the program
of each (sequence, head) that finishes last (an atomic count), in the same launch. Elsewhere the
keys are gathered and fed to SDPA. Both take the same metadata and are CUDA-graph safe.

The cache may hold FP8 (E4M3) values: ``stored = value / scale`` with one scale per layer for K and
one for V (``k_scale``, ``v_scale``); both paths dequantize on read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from telechat.model.attention import attention
from telechat.model.kernels import FP8_DTYPE, arrival_counters, pdl_options

try:  # Triton ships with CUDA builds of torch; CPU installs use the gather path.
    import triton
    import triton.language as tl

    from telechat.model.kernels import pdl_begin
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_PARTITIONS = 32


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch shape of the decode kernel (bench/paged_attention.py sweeps these on the card)."""

    tokens: int = 64
    """Cached tokens one program reads per loop iteration (and the granularity of a partition)."""
    num_warps: int = 2
    num_stages: int = 1
    target_programs: int = 2048
    """Programs a launch aims to have (about 16 per SM of a 132-SM card): more partitions for fewer rows."""
    early_v: bool = True
    """Issue the V load together with the K load, before the softmax arithmetic that needs only K."""


DEFAULT_CONFIG = DecodeKernelConfig()
"""The H200 sweep's best single shape (bench/results/h200-paged-attention.json): within 4 % of each case's
own best over 1-256 sequences and 160-32k tokens, bf16 and FP8 caches; the previous default (4 warps,
2 stages, V loaded after the softmax) was 1.44x slower."""


def num_partitions(rows: int, heads: int, max_context: int, config: DecodeKernelConfig = DEFAULT_CONFIG) -> int:
    """Partitions per (sequence, head) for a launch of ``rows`` sequences: enough programs for the
    GPU, at most one per ``config.tokens`` tokens of the longest possible context. A function of
    shapes only, so it is fixed inside each captured CUDA graph."""
    by_load = max(1, config.target_programs // max(1, rows * heads))
    return max(1, min(MAX_PARTITIONS, by_load, math.ceil(max_context / config.tokens)))


if triton is not None:

    @triton.jit(do_not_specialize=["num_parts"])  # eager launches vary it: no compile per value
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, acc_ptr, stats_ptr, out_ptr, cnt_ptr, q_scale, v_scale,
        stride_qb, stride_qh, stride_tb, stride_ks, stride_kh, stride_ob, stride_oh,
        num_parts, num_heads,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        TOKENS: tl.constexpr, DIRECT: tl.constexpr, EARLY_V: tl.constexpr, P_PAD: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_begin(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        part = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b)
        kvh = h // GROUP
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_DIM
        # q_scale = softmax scale × the cache's K scale; under torch.compile it arrives as fp64
        q = (tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
             * q_scale).to(tl.float32)
        # this sequence's context split evenly over the partitions, in whole iterations
        part_len = tl.cdiv(tl.cdiv(seq_len, num_parts), TOKENS) * TOKENS
        start = part * part_len
        end = tl.minimum(start + part_len, seq_len)
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([D_PAD], dtype=tl.float32)
        for tok0 in range(start, end, TOKENS):
            offs_n = tok0 + tl.arange(0, TOKENS)
            n_mask = offs_n < end
            page = tl.load(table_ptr + b * stride_tb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
            slot = page.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            if EARLY_V:
                v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            s = tl.where(n_mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            if not EARLY_V:
                v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        acc = acc * v_scale
        if DIRECT:  # one partition: this program holds the whole softmax
            tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty),
                     mask=d_mask)
        else:  # an empty partition stores m = -inf, l = 0: weight 0 in the merge
            row = (b * num_heads + h) * num_parts + part
            tl.store(acc_ptr + row * D_PAD + offs_d, acc)
            tl.store(stats_ptr + row * 2, m_i)
            tl.store(stats_ptr + row * 2 + 1, l_i)
            tl.debug_barrier()  # every thread's part is written before the release below
            arrived = tl.atomic_add(cnt_ptr + b * num_heads + h, 1, sem="acq_rel", scope="gpu")
            if arrived == num_parts - 1:  # the last partition of this (sequence, head) merges them all
                _merge_parts(acc_ptr, stats_ptr, out_ptr, b, h, stride_ob, stride_oh, num_parts, num_heads,
                             HEAD_DIM, D_PAD, P_PAD)
                tl.store(cnt_ptr + b * num_heads + h, 0)


    @triton.jit
    def _merge_parts(acc_ptr, stats_ptr, out_ptr, b, h, stride_ob, stride_oh, num_parts, num_heads,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, P_PAD: tl.constexpr):
        """The output of (sequence ``b``, head ``h``) from its partitions' ``acc, m, l`` (log-sum-exp weights),
        read past L1: other programs of this launch wrote them."""
        row0 = (b * num_heads + h) * num_parts
        parts = tl.arange(0, P_PAD)
        p_mask = parts < num_parts
        m = tl.load(stats_ptr + (row0 + parts) * 2, mask=p_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(stats_ptr + (row0 + parts) * 2 + 1, mask=p_mask, other=0.0, cache_modifier=".cg")
        w = tl.where(m > float("-inf"), tl.exp(m - tl.max(m, axis=0)), 0.0)
        offs_d = tl.arange(0, D_PAD)
        acc = tl.load(acc_ptr + (row0 + parts)[:, None] * D_PAD + offs_d[None, :], mask=p_mask[:, None], other=0.0,
                      cache_modifier=".cg")
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    config: DecodeKernelConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """``q [B, N, d]`` against each sequence's cached ``seq_lens[b]`` tokens → ``[B, N, d]``.

    ``k_cache, v_cache``: ``[slots, n_kv, d]`` in ``q``'s dtype or FP8 (values stored divided by
    ``k_scale`` / ``v_scale``); ``block_tables [B, max_blocks]`` (int32); ``seq_lens [B]`` (int32, ≥ 1).
    ``config``: the Triton kernel's launch shape.
    """
    if q.is_cuda and triton is not None:
        return _triton_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, k_scale, v_scale, config)
    return _gather_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, k_scale, v_scale)


def _triton_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, k_scale, v_scale, config):
    bsz, heads, d = q.shape
    n_kv = k_cache.shape[1]
    parts = num_partitions(bsz, heads, block_tables.shape[1] * block_size, config)
    d_pad = triton.next_power_of_2(d)
    out = torch.empty(bsz, heads, d, dtype=q.dtype, device=q.device)
    direct = parts == 1
    acc = out if direct else torch.empty(bsz, heads, parts, d_pad, dtype=torch.float32, device=q.device)
    stats = out if direct else torch.empty(bsz, heads, parts, 2, dtype=torch.float32, device=q.device)
    counters = out if direct else arrival_counters(q.device, bsz * heads, "paged_decode")
    pdl = pdl_options(q.device, bsz)
    _paged_decode_kernel[(bsz, heads, parts)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, stats, out, counters, k_scale / math.sqrt(d), v_scale,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        out.stride(0), out.stride(1), parts, heads,
        GROUP=heads // n_kv, BLOCK_SIZE=block_size, HEAD_DIM=d, D_PAD=d_pad, TOKENS=config.tokens, DIRECT=direct,
        EARLY_V=config.early_v, P_PAD=MAX_PARTITIONS, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl,
    )
    return out


def read_kv(cache: torch.Tensor, slots: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``cache[slots]`` as ``dtype``: FP8 entries (read through a byte view: CUDA has no indexed read for
    float8 tensors) times their scale; others as they are."""
    if cache.dtype != FP8_DTYPE:
        return cache[slots].to(dtype)
    return (cache.view(torch.uint8)[slots].view(cache.dtype).float() * scale).to(dtype)


def _gather_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, k_scale, v_scale):
    lmax = int(seq_lens.max())
    pos = torch.arange(lmax, device=q.device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # [B, Lmax]
    keys = read_kv(k_cache, slots, k_scale, q.dtype).transpose(1, 2)  # [B, n_kv, Lmax, d]
    vals = read_kv(v_cache, slots, v_scale, q.dtype).transpose(1, 2)
    mask = (pos[None, :] < seq_lens[:, None])[:, None, None, :]
    return attention(q.unsqueeze(2), keys, vals, mask=mask).squeeze(2)
