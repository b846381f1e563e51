"""Per-request sampling parameters and batched sampling (greedy, temperature, top-k, top-p,
repetition penalty, seeds) for rows that each follow their own parameters."""

from __future__ import annotations

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
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: list[torch.Tensor], penalties: list[float]) -> None:
    """In place: for each row, divide positive / multiply negative logits of seen tokens."""
    for row, (ids, p) in enumerate(zip(seen, penalties)):
        if p == 1.0 or ids.numel() == 0:
            continue
        vals = logits[row, ids]
        logits[row, ids] = torch.where(vals > 0, vals / p, vals * p)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: list[torch.Tensor],
) -> list[int]:
    """Pick one token per row of ``logits [S, V]`` following each row's parameters.

    ``seen`` holds each row's prompt + output ids (for the repetition penalty); ``generators``
    each row's random generator (None = the global one).
    """
    logits = logits.float()
    apply_repetition_penalty(logits, seen, [p.repetition_penalty for p in params])
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    sub = logits[rows]
    temps = torch.tensor([params[i].temperature for i in rows], device=sub.device).unsqueeze(1)
    sub = sub / temps
    sorted_logits, sorted_ids = sub.sort(dim=-1, descending=True)
    ranks = torch.arange(sub.shape[-1], device=sub.device).unsqueeze(0)
    top_k = torch.tensor([params[i].top_k or sub.shape[-1] for i in rows], device=sub.device).unsqueeze(1)
    drop = ranks >= top_k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    top_p = torch.tensor([params[i].top_p for i in rows], device=sub.device).unsqueeze(1)
    # Drop a token when the mass before it already reaches top_p (the first token always stays).
    drop |= (probs.cumsum(-1) - probs) >= top_p
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    for j, i in enumerate(rows):
        choice = torch.multinomial(probs[j], 1, generator=generators[i])
        out[i] = int(sorted_ids[j, choice])
    return out
