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
def perplexity(
    model,
    token_ids: list[int] | torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    chunk: int | None = None,
) -> float:
    """``exp(mean NLL)`` of ``token_ids`` under ``model`` (a :class:`~telechat.model.modeling.TelechatForCausalLM`).

    Windows of ``seq_len`` tokens start every ``stride`` tokens (default ``seq_len``: non-overlapping).
    With ``stride < seq_len`` each window scores only the tokens the previous one did not, using the
    overlap as context (the usual sliding-window evaluation). Every token counts at most once; with
    non-overlapping windows the first token of each window has no context and is not scored.
    ``chunk`` bounds the positions per LM-head call (default :data:`DEFAULT_CHUNK`).
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
        total_nll += window_nll(model, ids[begin:end], num_scored=num_scored, logits_chunk=chunk)[0]
        count += num_scored
        scored_until = end
        if end == ids.numel():
            break
    mean = total_nll / count
    log.debug("perplexity over %d tokens: mean NLL %.4f", count, mean)
    return math.exp(mean)
