"""Perplexity of a causal LM over one long token stream, without materialising full logits.

The one chunked-NLL loop (:func:`window_nll`), shared by the GPTQ before/after report
(``jobs/quant``) and the long-context evaluator (``telechat eval-ppl``). The model runs one window
at a time (optionally in KV-cached chunks); the LM head and cross-entropy run over ``chunk``
positions at a time, so peak memory holds ``chunk × vocab`` logits, never ``seq_len × vocab``
(160k vocab × 32k tokens in float32 would be 20 GB).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024
"""Positions per LM-head/loss chunk: 1024 × 160k vocab × 4 B = 0.6 GiB of float32 logits."""


@torch.inference_mode()
def window_nll(
    model,
    window: torch.Tensor,
    *,
    num_scored: int | None = None,
    prefill_chunk: int | None = None,
    rope_length: int | None = None,
    logits_chunk: int = DEFAULT_CHUNK,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL of the last ``num_scored`` targets of a window (default: all
    ``len(window) - 1``), and that count.

    ``window`` is 1-D token ids; the earlier targets are context only (overlapping windows). With
    ``prefill_chunk`` smaller than the window it runs in chunks through a ``DynamicCache``;
    ``rope_length`` (default: the window length) pins the rotary parameters so the chunks equal
    one forward pass of the whole window. ``on_chunk(n)`` is called after each chunk of ``n``
    tokens (progress bars).
    """
    device = next(model.parameters()).device
    ids = window.to(device=device, dtype=torch.long).flatten()
    n = ids.numel()
    if n < 2:
        raise ValueError(f"a window needs at least 2 tokens, got {n}")
    num_scored = n - 1 if num_scored is None else num_scored
    first = n - 1 - num_scored  # first position whose next token is scored
    step = n if prefill_chunk is None or prefill_chunk >= n else prefill_chunk
    cache = DynamicCache(config=model.config) if step < n else None
    total = 0.0
    for start in range(0, n, step):
        piece = ids[start : start + step]
        out = model.transformer(input_ids=piece[None], past_key_values=cache, use_cache=cache is not None,
                                rope_length=rope_length or n)
        lo, hi = max(first - start, 0), min(piece.numel(), n - 1 - start)  # the last token has no target
        hidden, targets = out.last_hidden_state[0, lo:hi], ids[start + lo + 1 : start + hi + 1]
        for r in range(0, max(hi - lo, 0), logits_chunk):
            logits = model.lm_head(hidden[r : r + logits_chunk]).float()
            total += F.cross_entropy(logits, targets[r : r + logits_chunk], reduction="sum").item()
        if on_chunk is not None:
            on_chunk(piece.numel())
    return total, num_scored


@torch.inference_mode()
def paged_window_nll(model, window: torch.Tensor, *, num_scored: int | None = None, kv_cache_dtype: str = "auto",
                     prefill_chunk: int = 256, block_size: int = 16) -> tuple[float, int]:
    """:func:`window_nll` computed the way the serving engine computes a prompt: the model's
    ``forward_batch`` in prefill chunks over a paged KV cache of ``kv_cache_dtype`` (``fp8`` measures
    what the FP8 cache costs), later chunks reading earlier ones back from the cache."""
    from telechat.engine.kv_cache import PagedKVCache, PrefillChunk, StepAttention, kv_cache_torch_dtype
    from telechat.model.forward_batch import ForwardBatch
    from telechat.model.rope import inv_freq

    param = next(model.parameters())
    device, cfg = param.device, model.config
    ids = window.to(device=device, dtype=torch.long).flatten()
    n = ids.numel()
    num_scored = n - 1 if num_scored is None else num_scored
    blocks = math.ceil(n / block_size)
    cache = PagedKVCache(num_layers=cfg.n_layer, num_blocks=blocks, block_size=block_size,
                         n_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                         dtype=kv_cache_torch_dtype(kv_cache_dtype, param.dtype), device=device)
    rope = model.rope_params(n)
    freqs = inv_freq(rope.base, cfg.head_dim).to(device=device, dtype=torch.float32)
    first = n - 1 - num_scored
    total = 0.0
    for start in range(0, n, prefill_chunk):
        end = min(start + prefill_chunk, n)
        slots = torch.arange(end, device=device)  # one sequence filling the blocks in order
        chunk = PrefillChunk(row=0, start=start, end=end, context_slots=slots if start else None)
        attention = StepAttention(cache=cache, write_slots=slots[start:end], decode_rows=0, block_tables=None,
                                  seq_lens=None, prefills=[chunk])
        positions = torch.arange(start, end, device=device)
        batch = ForwardBatch(positions=positions, inv_freq=freqs.expand(end - start, -1),
                             mscale=torch.full((end - start,), rope.mscale, device=device), attention=attention)
        lo, hi = max(first, start), min(end, n - 1)  # positions whose next token is scored
        if lo >= hi:
            model.forward_batch(ids[start:end], batch)
            continue
        batch.logits_rows = torch.arange(lo - start, hi - start, device=device)
        logits = model.forward_batch(ids[start:end], batch)
        total += F.cross_entropy(logits, ids[lo + 1 : hi + 1], reduction="sum").item()
    return total, num_scored


@torch.inference_mode()
def perplexity(
    model,
    token_ids: list[int] | torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    chunk: int | None = None,
    kv_cache_dtype: str | None = None,
) -> float:
    """``exp(mean NLL)`` of ``token_ids`` under ``model`` (a :class:`~telechat.model.modeling.TelechatForCausalLM`).

    Windows of ``seq_len`` tokens start every ``stride`` tokens (default ``seq_len``: non-overlapping).
    With ``stride < seq_len`` each window scores only the tokens the previous one did not, using the
    overlap as context (the usual sliding-window evaluation). Every token counts at most once; with
    non-overlapping windows the first token of each window has no context and is not scored.
    ``chunk`` bounds the positions per LM-head call (default :data:`DEFAULT_CHUNK`). With
    ``kv_cache_dtype`` (``auto`` or ``fp8``) each window runs through the engine's paged KV cache of
    that dtype (:func:`paged_window_nll`) instead of the transformers forward.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    stride = stride or seq_len
    chunk = chunk or DEFAULT_CHUNK
    if seq_len < 2 or not 0 < stride <= seq_len or chunk < 1:
        raise ValueError(f"need seq_len >= 2, 0 < stride <= seq_len and chunk >= 1 (got {seq_len}, {stride}, {chunk})")
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    total_nll, scored_until, count = 0.0, 1, 0  # scored_until: first target position not yet scored
    starts = range(0, ids.numel() - 1, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", leave=False, disable=len(starts) < 2):
        end = min(begin + seq_len, ids.numel())
        num_scored = end - max(scored_until, begin + 1)
        if num_scored <= 0:
            continue
        if kv_cache_dtype is None:
            total_nll += window_nll(model, ids[begin:end], num_scored=num_scored, logits_chunk=chunk)[0]
        else:
            total_nll += paged_window_nll(model, ids[begin:end], num_scored=num_scored,
                                          kv_cache_dtype=kv_cache_dtype)[0]
        count += num_scored
        scored_until = end
        if end == ids.numel():
            break
    mean = total_nll / count
    log.debug("perplexity over %d tokens: mean NLL %.4f", count, mean)
    return math.exp(mean)
