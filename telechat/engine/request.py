"""One request's state inside the engine, and what the engine reports back per step.

Shared vocabulary of the scheduler (:mod:`telechat.engine.scheduler`), the model runner
(:mod:`telechat.engine.runner`) and the engine core (:mod:`telechat.engine.core`). Token counts
follow one rule: ``num_computed_tokens`` counts positions whose KV is written *or scheduled to be
written* by a step already handed to the runner; ``num_tokens`` counts prompt + known output +
placeholders (tokens sampled on the device that the host has not read yet, see docs/engine.md).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from telechat.engine.sampling import SamplingParams
from telechat.model.rope import RopeParams

if TYPE_CHECKING:
    from telechat.model.lora import LoraAdapter


class RequestStatus(enum.Enum):
    """Where a request is: queued (new or preempted), admitted, or gone."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """New tokens of one request after a step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (OpenAI ``usage.prompt_tokens_details.cached_tokens``)."""
    logprobs: list[tuple[float, list[int], list[float]]] | None = None
    """With ``SamplingParams.logprobs``: per new token, its log-probability, then the ids and
    log-probabilities of the most likely alternatives (decreasing)."""
    queue_s: float | None = None
    """On the output carrying the request's first token: seconds from its arrival at the engine to its
    first scheduling (vLLM's ``request_queue_time``)."""
    prefill_s: float | None = None
    """On the same output: seconds from the first scheduling to the first token read back (its prefill
    chunks, any preemption, and the step that sampled it; vLLM's ``request_prefill_time``)."""


@dataclass(eq=False)
class Request:
    """A request as the engine tracks it (identity equality: two requests are never equal)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int
    """Most tokens (prompt + output) this request may reach: min(context, prompt + max_tokens)."""
    rope: RopeParams | None = None
    """RoPE base and mscale, fixed by the prompt length (NTK scaling) when the request is added."""
    cache_salt: tuple = ()
    """Extra key of its first KV block's hash: everything besides the tokens that changes the cached KV
    (the RoPE base and mscale fixed by the prompt length; the LoRA adapter's load id)."""
    after: str | None = None
    """Id of a sibling (another choice of the same prompt, ``n`` > 1): this request is admitted once that
    one has its first token, so the prompt's full blocks are in the prefix cache and shared, not recomputed."""
    lora: LoraAdapter | None = None
    """The LoRA adapter this request runs with (None: the base model); the scheduler only reads its ``id``."""
    lora_slot: int | None = None
    """The device slot holding its adapter, held like ``row`` from the first admission to the end."""
    waiting_for_grammar: bool = False
    """Its structured-output grammar is still compiling: not admitted until the engine clears this."""
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    """When it was first admitted to the running batch (``time.monotonic``)."""
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_placeholders: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at the first admission."""
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    row: int | None = None
    """Stable per-request row of the runner's state (block table, penalties, generator); held from the
    first admission to the end, also while preempted."""
    aborted: bool = False
    abort_error: str | None = None
    """Why it was aborted when the server did it (shutdown); None when the client gave up."""

    @property
    def num_tokens(self) -> int:
        """Prompt + known output + placeholders."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_placeholders

    @property
    def num_known_tokens(self) -> int:
        """Prompt + output tokens the host knows."""
        return len(self.prompt_ids) + len(self.output_ids)

    def first_token_times(self, now: float) -> tuple[float, float]:
        """``(queue, prefill)`` seconds of a first token read back at ``now`` (see :class:`RequestOutput`)."""
        scheduled = self.arrival if self.first_scheduled is None else self.first_scheduled
        return scheduled - self.arrival, now - scheduled

    def known_ids(self, start: int, end: int) -> list[int]:
        """Known token ids at positions ``[start, end)`` (``end`` ≤ :attr:`num_known_tokens`)."""
        plen = len(self.prompt_ids)
        if end <= plen:
            return self.prompt_ids[start:end]
        if start >= plen:
            return self.output_ids[start - plen : end - plen]
        return self.prompt_ids[start:] + self.output_ids[: end - plen]
