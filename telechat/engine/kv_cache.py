"""Paged KV cache: fixed-size blocks pre-allocated from a memory budget (handed out by
:class:`~telechat.engine.block_pool.BlockPool`), and the attention backend that reads/writes it during one engine step.

Layout per layer: ``k[layer], v[layer]: [num_blocks * block_size, n_kv, head_dim]`` (a flat slot
array; slot = block * block_size + offset). A sequence owns a list of blocks (its block table).

With ``--kv-cache-dtype fp8`` the cache holds E4M3 values, ``stored = value / scale`` saturated to
±448, with one K and one V scale per layer (1.0: vLLM's default without calibrated scales; TeleChat's
K and V stay far inside ±448): half the bytes per token, twice the tokens in the
same memory. Every read dequantizes, and
a fresh prompt attends to the same rounded K/V it stores, so a turn served from the prefix cache
computes what the uncached turn computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from telechat.engine import prefix_attention
from telechat.engine.paged_attention import paged_decode_attention, read_kv
from telechat.engine.prefix_attention import ChunkTables, chunk_tables, prefix_prefill_attention
from telechat.engine.sampling import to_device
from telechat.model.attention import attention
from telechat.model.kernels import FP8_DTYPE, rope_and_cache

KV_CACHE_DTYPES = ("auto", "fp8")
"""``auto``: the model's dtype; ``fp8``: E4M3 with per-layer scales (also spelled ``fp8_e4m3``)."""
CONTEXT_GROUP_TOKENS = 16384
"""Without Triton (CPU): most context tokens one batched call over cached context reads back (chunks of one
span are batched up to it; a single chunk reads its whole context): bounds the copies of K and V it makes.
On CUDA the short chunks with cached context are attended straight from the cache instead
(:data:`PREFIX_KERNEL_TOKENS`)."""
PREFIX_KERNEL_TOKENS = 256
"""On CUDA, chunks with cached context of at most this many new tokens (chat turns, prefix-cache hits) are
attended straight from the cache by :mod:`telechat.engine.prefix_attention`, all in one launch per layer; there
copying the context out costs more than attending to it (≈ 220 new tokens is where the two cost the same on an
H200). Longer chunks (a long prompt's later chunks) keep the gather + SDPA path, whose flash kernel is the
faster at that much compute."""


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache dtype of a ``--kv-cache-dtype`` value (``ValueError`` for an unknown one)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_DTYPE
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")


def _group_rows(firsts: list[int], n: int, device: torch.device) -> slice | torch.Tensor:
    """The flat-batch rows of chunks of ``n`` tokens starting at ``firsts``: a slice when they are
    consecutive, else an index."""
    if all(b == a + n for a, b in zip(firsts, firsts[1:])):
        return slice(firsts[0], firsts[0] + n * len(firsts))
    return to_device([r + i for r in firsts for i in range(n)], torch.long, device)


def check_kv_cache_device(dtype: torch.dtype, device: torch.device) -> None:
    """``ValueError`` (one line) for an FP8 cache on a CUDA GPU that cannot convert to E4M3 natively."""
    if dtype == FP8_DTYPE and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"kv_cache_dtype fp8 needs compute capability 8.9+ (Ada/Hopper); this GPU is "
                         f"{torch.cuda.get_device_name(device)} ({major}.{minor}); use --kv-cache-dtype auto")


class PagedKVCache:
    """The pre-allocated K and V tensors of every layer."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        slots = num_blocks * block_size
        self.k = [torch.zeros(slots, n_kv, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(slots, n_kv, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_scales = [1.0] * num_layers
        """Per layer: stored K = K / scale (1.0: no calibrated scales are loaded yet, vLLM's default)."""
        self.v_scales = [1.0] * num_layers

    @property
    def is_fp8(self) -> bool:
        """Whether the cache stores E4M3 values."""
        return self.dtype == FP8_DTYPE

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
    prefills: Sequence[PrefillChunk] = ()
    _fresh: list[tuple[slice | torch.Tensor, int, int]] | None = field(default=None, repr=False)
    _context: list[tuple[slice | torch.Tensor, int, int, torch.Tensor]] | None = field(default=None, repr=False)
    _tables: ChunkTables | bool | None = field(default=None, repr=False)

    def fresh_groups(self, device: torch.device) -> list[tuple[slice | torch.Tensor, int, int]]:
        """The fresh prompts (no cached context) grouped by length, each group attended in one batched call
        (a burst of same-length prompts costs one kernel per layer, not one per prompt): ``(rows, count,
        length)`` with ``rows`` a slice when the group's rows are consecutive, else an index. Built once per step."""
        if self._fresh is None:
            by_length: dict[int, list[int]] = {}
            for chunk in self.prefills:
                if chunk.context_slots is None:
                    by_length.setdefault(chunk.end - chunk.start, []).append(chunk.row)
            self._fresh = [(_group_rows(firsts, n, device), len(firsts), n) for n, firsts in by_length.items()]
        return self._fresh

    def context_groups(self, device: torch.device) -> list[tuple[slice | torch.Tensor, int, int, torch.Tensor]]:
        """The chunks with cached context (but those attended straight from the cache, :meth:`context_tables`)
        grouped by ``(start, end)``, each group attended in one batched call
        (a burst of prompts served from the prefix cache at the same length costs one call per layer, not one
        per prompt; at most :data:`CONTEXT_GROUP_TOKENS` context tokens per call): ``(rows, count, length,
        context slots [count, end])``, ``rows`` as in :meth:`fresh_groups`. Built once per step."""
        if self._context is None:
            by_span: dict[tuple[int, int], list[PrefillChunk]] = {}
            for chunk in self.prefills:
                if chunk.context_slots is not None and not self._from_cache(chunk, device):
                    by_span.setdefault((chunk.start, chunk.end), []).append(chunk)
            groups = []
            for (start, end), span in by_span.items():
                n = end - start
                per_call = max(1, CONTEXT_GROUP_TOKENS // end)
                for chunks in (span[i : i + per_call] for i in range(0, len(span), per_call)):
                    groups.append((_group_rows([c.row for c in chunks], n, device), len(chunks), n,
                                   torch.stack([c.context_slots for c in chunks])))
            self._context = groups
        return self._context

    @staticmethod
    def _from_cache(chunk: PrefillChunk, device: torch.device) -> bool:
        """Whether ``chunk`` (one with cached context) is attended straight from the cache
        (:data:`PREFIX_KERNEL_TOKENS`)."""
        return (device.type == "cuda" and prefix_attention.triton is not None
                and chunk.end - chunk.start <= PREFIX_KERNEL_TOKENS)

    def context_tables(self, device: torch.device) -> ChunkTables | None:
        """The launch metadata of the chunks attended straight from the cache (None without any). Built once
        per step."""
        if self._tables is None:
            chunks = [c for c in self.prefills if c.context_slots is not None and self._from_cache(c, device)]
            self._tables = chunk_tables(chunks, device) if chunks else False
        return self._tables or None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output ``[T, Hq, d]`` for unrotated ``q [T, Hq, d]``, ``k, v [T, Hkv, d]``."""
        cache = self.cache
        kc, vc = cache.k[layer], cache.v[layer]
        ks, vs = cache.k_scales[layer], cache.v_scales[layer]
        if not self.prefills:
            q = rope_and_cache(q, k, v, cos, sin, kc, vc, self.write_slots, ks, vs)
            return paged_decode_attention(q, kc, vc, self.block_tables, self.seq_lens, cache.block_size, ks, vs)
        q = rope_and_cache(q, k, v, cos, sin, kc, vc, self.write_slots, ks, vs)  # one launch, as decode's
        k = read_kv(kc, self.write_slots, ks, q.dtype)  # the rotated keys, as the cache holds them
        if cache.is_fp8:  # attend to the values the cache holds too (see the module doc)
            v = read_kv(vc, self.write_slots, vs, q.dtype)
        out = torch.empty_like(q)
        if self.decode_rows:
            n = self.decode_rows
            out[:n] = paged_decode_attention(q[:n], kc, vc, self.block_tables, self.seq_lens, cache.block_size, ks, vs)
        for rows, count, n in self.fresh_groups(q.device):  # fresh sequences: their own keys, causal
            qg, kg, vg = (t[rows].view(count, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))  # (G, H, n, d)
            out[rows] = attention(qg, kg, vg, causal=True).transpose(1, 2).reshape(count * n, *q.shape[1:])
        tables = self.context_tables(q.device)
        if tables is not None:  # the short chunks with cached context: one launch, straight from the cache
            prefix_prefill_attention(q, kc, vc, tables, out, ks, vs)
        for rows, count, n, slots in self.context_groups(q.device):  # the others: context read back from the cache
            qg = q[rows].view(count, n, *q.shape[1:]).transpose(1, 2)  # (G, Hq, n, d)
            kk, vv = (read_kv(t, slots, scale, q.dtype).transpose(1, 2)
                      for t, scale in ((kc, ks), (vc, vs)))  # (G, Hkv, end, d)
            out[rows] = attention(qg, kk, vv, causal=True).transpose(1, 2).reshape(count * n, *q.shape[1:])
        return out
