"""Perplexity of a causal LM over one long token stream, without materialising full logits.

Shared by the GPTQ before/after report (``jobs/quant``) and the long-context evaluator
(``telechat eval-ppl``). The model runs one window at a time; the LM head and cross-entropy run
over ``chunk`` positions at a time, so peak memory holds ``chunk × vocab`` logits, never
``seq_len × vocab`` (160k vocab × 32k tokens in float32 would be 20 GB).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024
"""Positions per LM-head/loss chunk: 1024 × 160k vocab × 4 B = 0.6 GiB of float32 logits."""


def window_nll(model, window: torch.Tensor, num_scored: int, chunk: int = DEFAULT_CHUNK) -> float:
    """Summed negative log-likelihood of the last ``num_scored`` targets of one window.

    ``window`` is a 1-D tensor of token ids on the model's device. Targets are ``window[1:]``;
    only the last ``num_scored`` of them count (the earlier ones are context when windows overlap).
    """
    hidden = model.transformer(input_ids=window[None], use_cache=False).last_hidden_state[0]
    hidden = hidden[-num_scored - 1 : -1]  # positions whose next token is scored
    targets = window[-num_scored:]
    total = 0.0
    for start in range(0, num_scored, chunk):
        logits = model.lm_head(hidden[start : start + chunk]).float()
        total += F.cross_entropy(logits, targets[start : start + chunk], reduction="sum").item()
    return total


@torch.inference_mode()
def perplexity(
    model,
    token_ids: list[int] | torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    chunk: int | None = None,
) -> float:
    """``exp(mean NLL)`` of ``token_ids`` under ``model`` (a :class:`~telechat.modeling.TelechatForCausalLM`).

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
        total_nll += window_nll(model, ids[begin:end], num_scored, chunk)
        count += num_scored
        scored_until = end
        if end == ids.numel():
            break
    mean = total_nll / count
    log.debug("perplexity over %d tokens: mean NLL %.4f", count, mean)
    return math.exp(mean)
