"""Per-request sampling parameters and batched sampling (greedy, temperature, top-k, top-p,
repetition penalty, seeds) for rows that each follow their own parameters.

A row whose numbers go bad (NaN or infinite logits, no probability mass left) fails on its own:
:func:`sample` reports it as ``None`` and draws the other rows as if it were not there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already seen (``presence [S, V]``)."""
    p = penalties.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(presence, penalised, logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    presence: torch.Tensor | None = None,
    default_generator: torch.Generator | None = None,
) -> list[int | None]:
    """Pick one token per row of ``logits [S, V]`` following each row's parameters.

    ``presence [S, V]`` marks each row's prompt + output tokens (needed when a row has a
    repetition penalty); ``generators`` are per-row generators (None = ``default_generator``).
    Rows sharing the default generator are drawn in one batched call; the result crosses to
    the host once. A row whose logits or probabilities are not finite gets ``None`` (its request
    has failed); it never changes what the other rows draw from, and never reaches
    ``torch.multinomial`` (which would raise, or assert on CUDA, for the whole batch).
    """
    logits = logits.float()
    dev = logits.device
    if presence is not None and any(p.repetition_penalty != 1.0 for p in params):
        pen = torch.tensor([p.repetition_penalty for p in params], device=dev)
        logits = apply_repetition_penalty(logits, presence, pen)
    # NaN from the model, or +inf from a penalty (-inf only rules a token out)
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)
    choice = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=dev)
        vocab = logits.shape[-1]
        sub = logits[idx] / torch.tensor([params[i].temperature for i in rows], device=dev).unsqueeze(1)
        sorted_logits, sorted_ids = sub.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=dev).unsqueeze(0)
        top_k = torch.tensor([min(params[i].top_k, vocab) or vocab for i in rows], device=dev).unsqueeze(1)
        drop = ranks >= top_k
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        top_p = torch.tensor([params[i].top_p for i in rows], device=dev).unsqueeze(1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always
        # stays (a top_p that rounds to 0 in float32 would otherwise drop every token).
        drop |= (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        row_bad = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)
        bad[idx] |= row_bad
        # A failed row draws from a harmless one-hot instead, so the batched draw cannot fail.
        probs = torch.where(row_bad.unsqueeze(1), ranks.eq(0).float(), probs)
        picked = torch.empty(len(rows), dtype=torch.long, device=dev)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:
            sel = torch.tensor(shared, device=dev)
            picked[sel] = torch.multinomial(probs[sel], 1, generator=default_generator).squeeze(1)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                picked[j] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
        choice[idx] = sorted_ids.gather(1, picked.unsqueeze(1)).squeeze(1)
    tokens, failed = torch.stack([choice, bad.long()]).tolist()
    return [None if f else t for t, f in zip(tokens, failed)]
