"""What the scheduler hands the model runner for one step (plain data, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from telechat.engine.request import Request, RequestOutput


@dataclass
class ScheduledChunk:
    """Positions ``[start, start + num_tokens)`` of one request, computed in this step."""

    request: Request
    start: int
    num_tokens: int
    token_ids: list[int]
    """The input ids of those positions, when the host knows them (always for prefill chunks)."""
    from_previous: bool = False
    """A one-token decode whose input is the token this request sampled in the *previous* step, still
    on the device (``token_ids`` is then empty): the runner takes it from that step's sampled ids."""
    sample: bool = False
    """The chunk reaches the end of the request's context: sample one token after it."""

    @property
    def end(self) -> int:
        """First position after the chunk."""
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    """One step: decodes first (one token each), then prefill chunks, within the token budget."""

    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    new_rows: list[Request] = field(default_factory=list)
    """Requests admitted for the first time this step: the runner sets up their row's state
    (penalty presence from the prompt, seeded generator)."""
    reset_rows: list[int] = field(default_factory=list)
    """Rows whose requests lost their blocks (preempted) since the last step: their device block
    table starts again from nothing."""
    freed_rows: list[int] = field(default_factory=list)
    """Rows released since the last step (requests finished or aborted): the runner forgets them."""
    lora_loads: list[tuple[int, object]] = field(default_factory=list)
    """``(slot, LoraAdapter)``: adapters to copy into device slots before this step runs."""
    finished: list[RequestOutput] = field(default_factory=list)
    """Requests that ended while scheduling (aborted): reported with this step's outputs."""

    @property
    def chunks(self) -> list[ScheduledChunk]:
        """Every chunk, in row order of the step's flat batch (decodes, then prefills)."""
        return self.decodes + self.prefills

    @property
    def sampled(self) -> list[ScheduledChunk]:
        """Chunks that sample a token, in the order the runner returns their tokens."""
        return [c for c in self.chunks if c.sample]

    @property
    def num_tokens(self) -> int:
        """Tokens computed in this step."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        """Nothing to compute."""
        return not self.decodes and not self.prefills
