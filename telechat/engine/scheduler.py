"""The scheduler: which request computes which tokens in each step (pure Python, no tensors).

Per step (docs/engine.md, "One step"): :meth:`Scheduler.schedule` drops aborted requests, gives every
running request whose context is complete but for its last token a one-token decode (preempting the
most recently admitted running request when the KV cache cannot hold it), then fills the rest of the
token budget with prefill chunks: requests already prefilling, then waiting ones in arrival order.
:meth:`Scheduler.update_from_output` takes the sampled tokens, applies the stop rules and frees what
finished requests held.

The scheduler runs ahead of the device by at most one step ("Overlap of host and device"): a token
sampled by a step whose output is still unread is a placeholder, counted in ``num_tokens``; a decode
whose input is one is ``from_previous``. Counts advance when a chunk is scheduled, so the same calls
give the same tokens whether each update follows its schedule or comes after the next schedule.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from telechat.engine.block_pool import BlockPool, block_hashes
from telechat.engine.lora_slots import LoraSlotTable
from telechat.engine.request import Request, RequestOutput, RequestStatus
from telechat.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from telechat.engine.stop import finish_reason, out_of_room

log = logging.getLogger(__name__)

SAMPLING_FAILED = "sampling failed: the next-token probabilities are not finite (NaN or infinite)"


@dataclass
class SchedulerConfig:
    """Capacity the scheduler works within, fixed at start."""

    max_num_seqs: int
    """Most requests running (admitted) at once."""
    max_num_batched_tokens: int
    """Token budget of one step: decodes plus prefill chunks (at least ``max_num_seqs``)."""
    block_size: int
    """Tokens per KV block."""
    num_blocks: int
    """KV blocks, the scratch block 0 included (never handed out)."""
    max_model_len: int
    """Longest prompt + output of a request (reported in :meth:`Scheduler.stats`)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks seen before (hash-chained, LRU eviction)."""
    num_rows: int | None = None
    """Rows of the runner's per-request state; default ``2 * max_num_seqs``: the running requests plus
    as many preempted ones waiting to resume (they keep their row)."""
    max_loras: int = 0
    """LoRA adapter slots on the device: requests admitted at once use at most this many distinct adapters."""

    def __post_init__(self) -> None:
        if self.num_rows is None:
            self.num_rows = 2 * self.max_num_seqs
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len", "num_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (one is scratch space), got {self.num_blocks}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs}): every running request may decode in one step")


class Scheduler:
    """Continuous batching with chunked prefill, preemption by recompute and prefix caching.

    Drive it with :meth:`schedule` and :meth:`update_from_output` in step order; at most one step's
    output may be unread when the next :meth:`schedule` runs.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.pool = BlockPool(config.num_blocks, config.block_size, config.enable_prefix_caching, reserved=1)
        self.requests: dict[str, Request] = {}
        """Requests waiting or running, by id."""
        self.waiting: deque[Request] = deque()
        """New requests in arrival order, preempted ones in front."""
        self.running: list[Request] = []
        """Admitted requests in admission order (the last one is preempted first)."""
        self.num_preemptions = 0
        self.tokens_generated = 0
        self._free_rows = list(range(config.num_rows - 1, -1, -1))  # pop() hands out the lowest row
        self.lora_slots = LoraSlotTable(config.max_loras)
        self._freed_rows: list[int] = []  # released since the last schedule, reported by the next one
        self._aborted: list[Request] = []
        self._hashes: dict[str, list[bytes]] = {}  # request id -> digests of its full known blocks
        self._num_registered: dict[str, int] = {}  # request id -> leading blocks of its table in the cache

    # ------------------------------------------------------------------ requests

    def add_request(self, request: Request) -> None:
        """Queue a request (validated by the engine, ``rope``, ``cache_salt`` and ``max_len`` set)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str, error: str | None = None) -> None:
        """Mark a request aborted; it leaves at the next :meth:`schedule` with finish reason "abort" and
        ``error`` (None when the client gave up). Unknown or finished ids are ignored."""
        request = self.requests.get(request_id)
        if request is None or request.aborted:
            return
        request.aborted = True
        request.abort_error = error
        self._aborted.append(request)

    def refuse(self, request_id: str) -> None:
        """Remove a request that was never admitted, with no output (the engine refuses it after all, e.g.
        its grammar cannot be compiled). Unknown ids are ignored; ``ValueError`` for one that ran."""
        request = self.requests.get(request_id)
        if request is None:
            return
        if request.row is not None:
            raise ValueError(f"request {request_id!r} has run; end it with abort()")
        self._finish(request, "abort")

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.requests)

    def reset(self) -> None:
        """Back to the state after start (no request may be unfinished): prefix cache and figures cleared."""
        if self.requests:
            raise RuntimeError("the scheduler can only be reset with no request unfinished")
        self.pool.reset_prefix_cache()
        self.num_preemptions = self.tokens_generated = 0

    def stats(self) -> dict:
        """Queue, KV cache and prefix cache figures (``prefix_cache_*`` in tokens)."""
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_usage": self.pool.usage,
            "kv_capacity_tokens": self.pool.num_blocks * self.config.block_size,
            "preemptions": self.num_preemptions,
            "prefix_cache_queries": self.pool.queries,
            "prefix_cache_hits": self.pool.hits,
            "tokens_generated": self.tokens_generated,
            "max_model_len": self.config.max_model_len,
        }

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Decide the next step: aborted requests leave, decodes, then prefill chunks within the budget."""
        out = SchedulerOutput()
        for request in self._aborted:
            if request.status is not RequestStatus.FINISHED:  # not ended meanwhile (stop, failure)
                out.finished.append(self._finish(request, "abort", error=request.abort_error))
        self._aborted.clear()
        out.freed_rows, self._freed_rows = self._freed_rows, []

        preempted = self._schedule_decodes(out)
        budget = self.config.max_num_batched_tokens - len(out.decodes)
        budget, blocked = self._schedule_running_prefills(out, budget)
        # Under memory pressure (a preemption, a prefill short of blocks) no new request is admitted.
        if not preempted and not blocked:
            self._admit(out, budget, keep_free=len(out.decodes))
        # Rows reported freed become free after this step, so no output both frees and assigns a row.
        self._free_rows.extend(out.freed_rows)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> bool:
        """One-token chunks for running requests with only their last token to compute; returns whether
        a request was preempted for lack of blocks."""
        preempted = False
        for request in list(self.running):
            if (request.status is not RequestStatus.RUNNING  # preempted below for an earlier request
                    or request.num_computed_tokens != request.num_tokens - 1 or out_of_room(request)):
                continue
            while not self._grow(request, request.num_tokens):
                victim = self.running[-1]  # never one scheduled already: decodes go in admission order
                self._preempt(victim, out)
                preempted = True
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                out.decodes.append(self._chunk(request, 1))
        return preempted

    def _schedule_running_prefills(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        """Next chunks of admitted requests still prefilling; returns the budget left and whether one of
        them could not get its blocks."""
        for request in list(self.running):
            if budget <= 0:
                break
            if request.num_computed_tokens >= request.num_tokens - 1:  # decoding, or out of room
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow(request, request.num_computed_tokens + n):
                return budget, True
            out.prefills.append(self._chunk(request, n))
            budget -= n
        return budget, False

    def _admit(self, out: SchedulerOutput, budget: int, keep_free: int) -> None:
        """Admit waiting requests in order while seats, rows, blocks (``keep_free`` left for the decodes)
        and budget allow; a request whose last tokens are still on the device waits for them."""
        bs = self.config.block_size
        slot_wait = False  # a request waits for a LoRA slot: no other adapter request is admitted before it
        for request in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            # Preempted with a token in flight. No admission follows a preemption in the same step, so
            # the update in between has normally read it; this keeps a re-admission from ever needing it.
            if request.num_placeholders or request.waiting_for_grammar or self._sibling_pending(request):
                continue
            if request.row is None and not self._free_rows:
                return
            if request.lora is not None and request.lora_slot is None and (
                    slot_wait or not self.lora_slots.can_take(request.lora.id)):
                # Every slot serves other adapters' running requests. Base requests behind it may go; adapter
                # requests wait too, so the slots drain and it gets the first one freed (no starvation).
                slot_wait = True
                continue
            # Never the whole context from the cache: the last token is computed, it yields the logits.
            cached = self._find_cached(request, (request.num_tokens - 1) // bs)
            computed = len(cached) * bs
            n = min(request.num_tokens - computed, budget)
            need = self._blocks_for(computed + n) - len(cached)
            if need + self.pool.num_idle(cached) + keep_free > self.pool.num_free:
                return
            self.pool.take_cached(cached, request.num_tokens)
            request.block_ids = cached + self.pool.allocate(need)
            request.num_computed_tokens = computed
            self._num_registered[request.request_id] = len(cached)
            self.waiting.remove(request)
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.row is None:
                request.row = self._free_rows.pop()
                request.first_scheduled = time.monotonic()
                request.num_cached_tokens = computed
                if request.lora is not None:
                    request.lora_slot, load = self.lora_slots.take(request.lora.id)
                    if load:
                        out.lora_loads.append((request.lora_slot, request.lora))
                out.new_rows.append(request)
            out.prefills.append(self._chunk(request, n))
            budget -= n

    def _sibling_pending(self, request: Request) -> bool:
        """True while the sibling ``request`` follows (``Request.after``) has not read its first token: its
        prompt blocks are not yet in the prefix cache, and admitting now would compute them twice."""
        sibling = self.requests.get(request.after) if request.after else None
        return (self.config.enable_prefix_caching and sibling is not None and not sibling.output_ids
                and request.row is None)

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        """Schedule the request's next ``n`` positions: counts advance now, a sampling chunk adds a
        placeholder for the token it will produce."""
        start = request.num_computed_tokens
        end = start + n
        if end > request.num_known_tokens:  # a decode whose input is the previous step's token
            chunk = ScheduledChunk(request, start, n, [], from_previous=True)
        else:
            chunk = ScheduledChunk(request, start, n, request.known_ids(start, end))
        request.num_computed_tokens = end
        if end == request.num_tokens:
            chunk.sample = True
            request.num_placeholders += 1
        return chunk

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Give the request blocks for its first ``num_tokens`` positions; False when too few are free."""
        need = self._blocks_for(num_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        request.block_ids.extend(self.pool.allocate(need))
        return True

    def _blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` positions."""
        return -(-num_tokens // self.config.block_size)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Take a running request's blocks; it recomputes later (its cached blocks make that cheap) and
        keeps its row, RoPE and placeholders."""
        self.running.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        self._num_registered[request.request_id] = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        out.reset_rows.append(request.row)
        self.num_preemptions += 1
        log.info("preempted %s (KV cache full); it will be recomputed", request.request_id)

    # ------------------------------------------------------------------ prefix cache

    def _block_hashes(self, request: Request, n: int) -> list[bytes]:
        """Digests of (at least) the request's first ``n`` full blocks, whose tokens must be known."""
        hashes = self._hashes.setdefault(request.request_id, [])
        if len(hashes) < n:
            bs = self.config.block_size
            hashes += block_hashes(request.known_ids(len(hashes) * bs, n * bs), bs, request.cache_salt,
                                   hashes[-1] if hashes else None)
        return hashes

    def _find_cached(self, request: Request, max_blocks: int) -> list[int]:
        """The cached blocks of the longest run of the request's first ``max_blocks`` full blocks."""
        if not self.config.enable_prefix_caching or max_blocks <= 0:
            return []
        return self.pool.find_cached(self._block_hashes(request, max_blocks)[:max_blocks])

    def _register(self, request: Request, computed: int) -> None:
        """Register the request's full blocks whose tokens are known and computed (up to ``computed``,
        the end of a chunk whose output was read, so the device has written them)."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        full = min(computed, request.num_known_tokens) // bs
        first = self._num_registered[request.request_id]
        if full <= first:
            return
        hashes = self._block_hashes(request, full)
        for i in range(first, full):
            self.pool.register(request.block_ids[i], hashes[i])
        self._num_registered[request.request_id] = full

    # ------------------------------------------------------------------ update

    def update_from_output(self, sched: SchedulerOutput, tokens: list[int | None],
                           logprobs: list | None = None) -> list[RequestOutput]:
        """Apply a step's sampled ``tokens`` (aligned with ``sched.sampled``; None where sampling failed)
        and their ``logprobs`` (aligned too, see ``StepResult.logprobs``; None when no row asked):
        append them, apply the stop rules, free finished requests. Returns ``sched.finished`` (aborts)
        first, then one output per sampled chunk of a request not finished before; a chunk of a finished
        request (computed after its stop) is dropped."""
        sampled = sched.sampled
        if len(tokens) != len(sampled):
            raise ValueError(f"{len(tokens)} tokens for {len(sampled)} sampled chunks")
        outputs = list(sched.finished)
        for chunk in sched.chunks:
            if not chunk.sample and chunk.request.status is RequestStatus.RUNNING:
                self._register(chunk.request, chunk.end)
        for i, (chunk, token) in enumerate(zip(sampled, tokens)):
            request = chunk.request
            if request.status is RequestStatus.FINISHED:
                continue
            request.num_placeholders -= 1
            if token is None:  # its KV may be bad as well: nothing of this chunk is registered
                log.warning("%s: %s", request.request_id, SAMPLING_FAILED)
                outputs.append(self._finish(request, "error", error=SAMPLING_FAILED))
                continue
            # A request preempted since this chunk was scheduled (waiting now) holds other blocks or none.
            if request.status is RequestStatus.RUNNING:
                self._register(request, chunk.end)
            request.output_ids.append(token)
            self.tokens_generated += 1
            reason = finish_reason(request)
            if reason is not None:
                outputs.append(self._finish(request, reason, new=[token]))
            else:
                outputs.append(RequestOutput(request.request_id, [token], num_prompt_tokens=len(request.prompt_ids),
                                             num_output_tokens=len(request.output_ids),
                                             num_cached_tokens=request.num_cached_tokens))
            if len(request.output_ids) == 1:
                outputs[-1].queue_s, outputs[-1].prefill_s = request.first_token_times(time.monotonic())
            if logprobs is not None and logprobs[i] is not None:
                outputs[-1].logprobs = [logprobs[i]]
        return outputs

    def fail(self, requests: list[Request], error: str) -> list[RequestOutput]:
        """End these requests (those not finished yet) with finish reason "error", e.g. their forward
        pass failed; a chunk of theirs still unread is dropped when it is."""
        return [self._finish(r, "error", error=error) for r in requests if r.status is not RequestStatus.FINISHED]

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every waiting or running request with finish reason "error"."""
        return self.fail(list(self.requests.values()), error)

    def _finish(self, request: Request, reason: str, new: list[int] | None = None,
                error: str | None = None) -> RequestOutput:
        """Remove a request: its blocks go back to the pool, its row to the next schedule's ``freed_rows``."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        self.pool.free(request.block_ids)
        request.block_ids = []
        if request.row is not None:
            self._freed_rows.append(request.row)
        if request.lora_slot is not None:
            self.lora_slots.release(request.lora_slot)
        del self.requests[request.request_id]
        self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        return RequestOutput(request.request_id, new or [], finished=True, finish_reason=reason,
                             num_prompt_tokens=len(request.prompt_ids), num_output_tokens=len(request.output_ids),
                             error=error, num_cached_tokens=request.num_cached_tokens)
