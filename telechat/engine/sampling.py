"""Per-request sampling parameters and batched sampling on the device (greedy, temperature, top-k,
top-p, min-p, repetition / frequency / presence penalties, logit bias, min_tokens, seeds) for rows
that each follow their own parameters, and the log-probabilities of rows that ask for them.

A row whose numbers go bad (NaN or infinite logits, no probability mass left) fails on its own:
:func:`sample_on_device` flags it and draws the other rows as if it were not there. Nothing here
waits for the device: the engine reads the tokens one step later (docs/engine.md, Overlap of
host and device).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from telechat.engine.guided import GrammarSpec

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per token (OpenAI's ``top_logprobs`` limit)."""


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops. Validated on construction (``ValueError``)."""

    max_tokens: int = 256
    """Most new tokens to generate (the context limit may stop earlier)."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches top_p; 1 keeps all."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in prompt or output (>1 discourages); 1 disables."""
    seed: int | None = None
    """Seed of this request's own random generator: same seed + same prompt = same text."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the returned text stops before the first of them."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (the chat format's ``<_end>``); not included in the text."""
    ignore_eos: bool = False
    """Keep generating through stop tokens (benchmarks with a fixed output length)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below ``min_p`` times the most likely one's; 0 keeps all."""
    min_tokens: int = 0
    """Stop token ids are ruled out (and stop strings not looked for) until this many tokens exist."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted from a token's logit once per time it occurs in the output so far."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted from a token's logit once if it occurs in the output so far."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """OpenAI: token id -> value added to its logit before sampling (-100 bans, +100 forces)."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and the ``logprobs`` most likely alternatives'
    (None: nothing; 0: the sampled token's only). Raw model distribution (log-softmax of the logits
    before penalties, bias and temperature, like vLLM's default ``raw_logprobs``)."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended the reply at its end."""
    guided: GrammarSpec | None = None
    """Structured output: the reply must match this grammar (JSON schema, regex, choice, ...); its
    tokens are masked to those the grammar allows (telechat/engine/guided.py)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit 64 bits, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2 <= v <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and token >= 0 and math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias maps token ids (>= 0) to values in [-100, 100], got {token!r}: {bias!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``data`` (numbers or a CPU tensor) as a tensor on ``device``, without waiting for the device's
    queued work: a plain copy from pageable memory would (pinned staging, non-blocking copy). The staging
    buffer comes from the pinned caching allocator, which keeps it until the copy is done; ``Tensor.pin_memory()``
    would first ask the driver whether ``data`` is pinned (``is_pinned``: ≈ 0.4 ms of host time per decode step
    on the H200 host, where an FP8 step's device time is ≈ 2.5 ms)."""
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    staged = torch.empty(host.shape, dtype=dtype, pin_memory=True)
    staged.copy_(host)
    return staged.to(device, non_blocking=True)


def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already seen (``presence [S, V]``)."""
    p = penalties.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(presence, penalised, logits)


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], num_generated: list[int],
                  output_counts: torch.Tensor | None = None) -> torch.Tensor:
    """``logits [S, V]`` with the OpenAI-style adjustments of the rows that ask for them: frequency and
    presence penalties (``output_counts [S, V]``: each token's count in the row's output so far),
    ``logit_bias``, and stop token ids ruled out while a row has fewer than ``min_tokens`` outputs
    (``num_generated``: outputs before this step's token). Returns ``logits`` itself when no row asks."""
    dev = logits.device
    if output_counts is not None:
        freq = to_device([p.frequency_penalty for p in params], torch.float32, dev).unsqueeze(1)
        pres = to_device([p.presence_penalty for p in params], torch.float32, dev).unsqueeze(1)
        logits = logits.float() - output_counts * freq - (output_counts > 0) * pres
    rows, cols, values = [], [], []
    vocab = logits.shape[-1]
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if token < vocab:
                rows.append(i), cols.append(token), values.append(bias)
        if num_generated[i] < p.min_tokens:
            for token in p.stop_token_ids:
                if token < vocab:
                    rows.append(i), cols.append(token), values.append(float("-inf"))
    if rows:
        logits = logits.float().clone() if output_counts is None else logits
        idx = to_device([rows, cols], torch.long, dev)
        logits.index_put_((idx[0], idx[1]), to_device(values, torch.float32, dev), accumulate=True)
    return logits


def needs_adjusting(params: SamplingParams) -> bool:
    """True when :func:`adjust_logits` changes this request's logits (at least at some step)."""
    return bool(params.frequency_penalty or params.presence_penalty or params.logit_bias
                or (params.min_tokens and params.stop_token_ids))


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``logits [R, V]`` (log-softmax of the raw distribution): ``[R, 1 + k]``
    float32 (the sampled ``tokens``' own first, then the ``k`` most likely in decreasing order) and
    ``[R, k]`` the ids of those ``k``. Nothing waits for the device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    own = logp.gather(1, tokens.clamp(min=0).unsqueeze(1))
    if k == 0:
        return own, torch.empty(len(tokens), 0, dtype=torch.long, device=logits.device)
    values, ids = logp.topk(k, dim=-1)
    return torch.cat([own, values], dim=1), ids


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs [S, V]`` drawn by its probabilities: ``argmax(p / Exp(1))``.

    This is what ``torch.multinomial(probs, 1)`` computes (same random numbers, same result), minus
    its validity checks, which copy to the host and so wait for the device; the caller keeps bad rows
    out instead.
    """
    q = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div(q).argmax(dim=-1)


def sample_on_device(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    presence: torch.Tensor | None = None,
    default_generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits [S, V]`` following each row's parameters, on the device.

    Returns ``(tokens [S] int64, failed [S] bool)`` without waiting for the device. ``presence [S, V]``
    marks each row's prompt + output tokens (needed when a row has a repetition penalty);
    ``generators`` are per-row generators (None = ``default_generator``). Rows sharing the default
    generator are drawn in one batched call, seeded rows one by one from their own generator, so a
    seeded row draws the same whatever its batch-mates. A row whose logits or probabilities are not
    finite is ``failed`` (its request has failed); it draws from a harmless one-hot instead and never
    changes what the other rows draw. Should the batched computation still raise, the rows are
    sampled one by one and only those that raise fail. ``allowed [S, V]`` (bool, optional): the
    tokens each row may take (structured output); the others are ruled out before anything else.
    """
    try:
        return _sample(logits, params, generators, presence, default_generator, allowed)
    except RuntimeError:
        log.exception("batched sampling failed; sampling the %d rows one by one", len(params))
    tokens, failed = [], []
    for i in range(len(params)):
        try:
            t, f = _sample(logits[i : i + 1], params[i : i + 1], generators[i : i + 1],
                           None if presence is None else presence[i : i + 1], default_generator,
                           None if allowed is None else allowed[i : i + 1])
        except RuntimeError:
            log.exception("sampling failed for one row")
            t = torch.zeros(1, dtype=torch.long, device=logits.device)
            f = torch.ones(1, dtype=torch.bool, device=logits.device)
        tokens.append(t)
        failed.append(f)
    return torch.cat(tokens), torch.cat(failed)


def _sample(logits, params, generators, presence, default_generator, allowed=None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    dev = logits.device
    penalties = [p.repetition_penalty for p in params]
    if presence is not None and any(p != 1.0 for p in penalties):
        logits = apply_repetition_penalty(logits, presence, to_device(penalties, torch.float32, dev))
    # NaN from the model, or +inf from a penalty (-inf only rules a token out)
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)
    choice = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return choice, bad
    vocab = logits.shape[-1]
    idx = to_device(rows, torch.long, dev)
    # float32 like the logits: a temperature or penalty that underflows to 0 makes the row non-finite (failed)
    temperature, top_k, top_p = to_device(
        [[params[i].temperature for i in rows], [min(params[i].top_k, vocab) or vocab for i in rows],
         [params[i].top_p for i in rows]], torch.float32, dev).unsqueeze(-1)
    sorted_logits, sorted_ids = (logits[idx] / temperature).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    drop = ranks >= top_k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token when the mass before it already reaches top_p; the most likely token always
    # stays (a top_p that rounds to 0 in float32 would otherwise drop every token).
    drop |= (probs.cumsum(-1) - probs) >= top_p
    min_p = [params[i].min_p for i in rows]
    if any(min_p):  # the ratio to the most likely token does not depend on the top-k renormalisation
        drop |= probs < to_device(min_p, torch.float32, dev).unsqueeze(-1) * probs[:, :1]
    drop[:, 0] = False
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    row_bad = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)
    bad[idx] = bad[idx] | row_bad
    probs = torch.where(row_bad.unsqueeze(1), ranks.eq(0).float(), probs)
    shared = [j for j, i in enumerate(rows) if generators[i] is None]
    if len(shared) == len(rows):
        picked = draw(probs, default_generator)
    else:
        picked = torch.empty(len(rows), dtype=torch.long, device=dev)
        if shared:
            sel = to_device(shared, torch.long, dev)
            picked[sel] = draw(probs[sel], default_generator)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                picked[j : j + 1] = draw(probs[j : j + 1], generators[i])
    choice[idx] = sorted_ids.gather(1, picked.unsqueeze(1)).squeeze(1)
    return choice, bad
