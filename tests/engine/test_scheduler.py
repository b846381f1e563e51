"""Scheduler invariants, no model involved.

A stand-in for the device (:class:`FakeDevice`) computes "KV" and tokens the way a model does as far
as the scheduler can tell: the KV written at a position is a digest of the cache salt and every token
up to it (what a transformer's upper layers hold), read back through the request's block table, and
the sampled token is a function of the last position's KV. It gives the reference tokens of
:func:`reference` only if every block table, cached block and placeholder the scheduler handed out was
right, and it checks that no step writes into a block that is cached or held by another request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from telechat.engine.request import Request, RequestOutput, RequestStatus
from telechat.engine.sampling import SamplingParams
from telechat.engine.scheduler import SAMPLING_FAILED, Scheduler, SchedulerConfig
from telechat.engine.scheduler_output import SchedulerOutput

VOCAB = 50
BS = 4


def kv(previous: int, token: int, salt: tuple) -> int:
    """The stand-in KV of a position: depends on the whole context up to it and on the salt (``hash`` of
    ints and floats is the same in every process)."""
    return hash((previous, token, salt))


def next_token(state: int) -> int:
    return state % VOCAB


def reference(prompt: list[int], params: SamplingParams, max_len: int, salt: tuple = ()) -> list[int]:
    """What one request produces alone, computed without the scheduler."""
    state = 0
    for t in prompt:
        state = kv(state, t, salt)
    out: list[int] = []
    while True:
        out.append(next_token(state))
        stop = not params.ignore_eos and out[-1] in params.stop_token_ids
        if stop or len(out) >= params.max_tokens or len(prompt) + len(out) >= max_len:
            return out
        state = kv(state, out[-1], salt)


class FakeDevice:
    """Executes a step: writes each chunk's KV into its blocks and samples where asked."""

    def __init__(self, sched: Scheduler, fail: set[tuple[str, int]] = frozenset()):
        self.sched = sched
        self.slots: dict[int, int] = {}
        self.fail = fail  # (request id, output index) whose sampling fails
        self.previous: dict[str, int] = {}  # request id -> token sampled by the previous step
        self.samples: dict[str, int] = {}  # request id -> sampled chunks so far

    def execute(self, step: SchedulerOutput) -> list[int | None]:
        pool, bs = self.sched.pool, self.sched.config.block_size
        sampled: dict[str, int] = {}
        tokens: list[int | None] = []
        for chunk in step.chunks:
            req = chunk.request
            ids = [self.previous[req.request_id]] if chunk.from_previous else chunk.token_ids
            assert len(ids) == chunk.num_tokens and chunk.end <= len(req.block_ids) * bs
            state = self.slots[req.block_ids[(chunk.start - 1) // bs] * bs + (chunk.start - 1) % bs] \
                if chunk.start else 0
            for pos, token in enumerate(ids, chunk.start):
                block = req.block_ids[pos // bs]
                assert pool.ref_count(block) == 1 and not pool.is_cached(block), "write into a shared block"
                state = kv(state, token, req.cache_salt)
                self.slots[block * bs + pos % bs] = state
            if chunk.sample:
                self.samples[req.request_id] = self.samples.get(req.request_id, 0) + 1
                sampled[req.request_id] = next_token(state)
                failed = (req.request_id, len(req.output_ids) + req.num_placeholders - 1) in self.fail
                tokens.append(None if failed else sampled[req.request_id])
        self.previous = sampled
        return tokens


@dataclass
class Stream:
    """What the client of one request saw."""

    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None
    cached: int = 0
    times: list[tuple[int, float, float]] = field(default_factory=list, compare=False)
    """(tokens seen before, queue seconds, prefill seconds) of every output that carried first-token times."""


class Harness:
    """A scheduler, the stand-in device and the engine's step loop, synchronous or overlapped
    (step N+1 scheduled and executed before step N's tokens are read)."""

    def __init__(self, overlap: bool = False, fail: set[tuple[str, int]] = frozenset(), **config):
        config = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "block_size": BS, "num_blocks": 65,
                  "max_model_len": 256} | config
        self.sched = Scheduler(SchedulerConfig(**config))
        self.device = FakeDevice(self.sched, fail)
        self.overlap = overlap
        self.pending: tuple[SchedulerOutput, list[int | None]] | None = None
        self.streams: dict[str, Stream] = {}
        self.steps: list[SchedulerOutput] = []
        self.peak_usage = 0.0

    def add(self, rid: str, prompt: list[int], salt: tuple = (), **params) -> Request:
        p = SamplingParams(**params)
        req = Request(rid, list(prompt), p, max_len=min(self.sched.config.max_model_len, len(prompt) + p.max_tokens),
                      cache_salt=salt)
        self.sched.add_request(req)
        self.streams[rid] = Stream()
        return req

    def step(self) -> SchedulerOutput:
        waiting = list(self.sched.waiting)
        step = self.sched.schedule()
        self.check(step, waiting)
        self.steps.append(step)
        self.peak_usage = max(self.peak_usage, self.sched.stats()["kv_usage"])
        tokens = self.device.execute(step)
        previous, self.pending = self.pending, (step, tokens) if self.overlap else None
        if previous is not None:
            self.collect(self.sched.update_from_output(*previous))
        if not self.overlap:
            self.collect(self.sched.update_from_output(step, tokens))
        return step

    def run(self, max_steps: int = 1000) -> dict[str, Stream]:
        """Step until every request ended, then read the step still unread (its chunks are dropped)."""
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                if self.pending is not None:
                    self.collect(self.sched.update_from_output(*self.pending))
                    self.pending = None
                return self.streams
            self.step()
        raise AssertionError("requests did not finish")

    def check(self, step: SchedulerOutput, waiting: list[Request]) -> None:
        c = self.sched.config
        admitted = [ch for ch in step.prefills if any(ch.request is r for r in waiting)]
        assert not (admitted and step.reset_rows), "admitted a request in a step that preempted one"
        assert step.num_tokens <= c.max_num_batched_tokens
        assert len(self.sched.running) <= c.max_num_seqs
        assert all(d.num_tokens == 1 for d in step.decodes)
        assert not {r.row for r in step.new_rows} & set(step.freed_rows)
        rows = [r.row for r in self.sched.requests.values() if r.row is not None]
        assert len(rows) == len(set(rows)) and all(0 <= r < c.num_rows for r in rows)
        for chunk in step.chunks:
            req = chunk.request
            assert req.status is RequestStatus.RUNNING
            # A sampling chunk reaches the end of the context, then one placeholder follows it.
            assert chunk.end == req.num_tokens - 1 if chunk.sample else chunk.end < req.num_tokens
            assert len(req.output_ids) + req.num_placeholders <= req.params.max_tokens, "scheduled past max_tokens"
            assert req.num_tokens <= req.max_len

    def collect(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:
            s = self.streams[o.request_id]
            assert s.reason is None, f"{o.request_id}: output after it finished"
            assert (o.queue_s is None) == (o.prefill_s is None)
            if o.queue_s is not None:
                s.times.append((len(s.tokens), o.queue_s, o.prefill_s))
            s.tokens += o.new_token_ids
            assert o.num_output_tokens == len(s.tokens)
            s.cached = o.num_cached_tokens
            if o.finished:
                s.reason, s.error = o.finish_reason, o.error

    def drained(self) -> bool:
        """Nothing left, every block back (usage accounting returns to zero) and every row handed out
        reported freed (by one more, empty, schedule)."""
        final = self.sched.schedule()
        self.steps.append(final)
        stats = self.sched.stats()
        handed = sum(len(s.new_rows) for s in self.steps)
        freed = sum(len(s.freed_rows) for s in self.steps)
        return (final.empty and not self.sched.has_unfinished() and stats["kv_usage"] == 0
                and stats["running"] == stats["waiting"] == 0 and handed == freed)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


MODES = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])


@MODES
def test_admission_in_arrival_order_within_max_num_seqs(overlap):
    """Requests are admitted oldest first, never more than max_num_seqs at once; each gets its
    reference tokens and a row that new_rows announces once."""
    h = Harness(overlap, max_num_seqs=2)
    prompts = {f"r{i}": prompt(5 + i, seed=i) for i in range(5)}
    for rid, p in prompts.items():
        h.add(rid, p, max_tokens=6)
    streams = h.run()
    admitted = [r.request_id for s in h.steps for r in s.new_rows]
    assert admitted == list(prompts)
    assert len(h.steps[0].new_rows) == 2
    for rid, p in prompts.items():
        assert streams[rid].tokens == reference(p, SamplingParams(max_tokens=6), 256)
    assert h.drained()


@MODES
def test_first_token_reports_queue_and_prefill_times(overlap):
    """The output carrying a request's first token, and only it, says how long the request waited for the
    running batch and how long from its first scheduling to that token; with one row, the second request
    waits at least as long as the first one's prefill took."""
    h = Harness(overlap, max_num_seqs=1, max_num_batched_tokens=8)
    h.add("first", prompt(20, seed=1), max_tokens=3)  # prefilled over three steps
    h.add("second", prompt(5, seed=2), max_tokens=3)
    streams = h.run()
    (seen, queue1, prefill1), = streams["first"].times
    (seen2, queue2, prefill2), = streams["second"].times
    assert seen == seen2 == 0  # on the output that carried the first token
    assert min(queue1, prefill1, queue2, prefill2) >= 0
    assert queue2 >= prefill1  # it was queued for the whole of the first request's prefill
    assert h.drained()


@MODES
def test_long_prompt_is_chunked_after_decodes(overlap):
    """A long prompt is split over steps within the token budget; decodes come first and take their
    share of it; only the chunk that reaches the end of the context samples."""
    h = Harness(overlap, max_num_batched_tokens=8)
    short, long = prompt(3, seed=1), prompt(20, seed=2)
    h.add("short", short, max_tokens=10)
    h.add("long", long, max_tokens=3)
    h.step()
    h.step()
    h.step()
    h.step()
    chunks = [[(c.request.request_id, c.start, c.num_tokens, c.sample) for c in s.chunks] for s in h.steps]
    assert chunks == [
        [("short", 0, 3, True), ("long", 0, 5, False)],
        [("short", 3, 1, True), ("long", 5, 7, False)],
        [("short", 4, 1, True), ("long", 12, 7, False)],
        [("short", 5, 1, True), ("long", 19, 1, True)],
    ]
    streams = h.run()
    assert streams["short"].tokens == reference(short, SamplingParams(max_tokens=10), 256)
    assert streams["long"].tokens == reference(long, SamplingParams(max_tokens=3), 256)
    assert h.drained()


@MODES
@pytest.mark.parametrize("caching", [True, False], ids=["cache", "no-cache"])
def test_preemption_under_a_tiny_cache_resumes_with_the_same_tokens(overlap, caching):
    """With room for fewer tokens than the requests need together, the newest running request is
    preempted (row kept, announced in reset_rows, back at the front of the queue), recomputed later,
    and every request still produces its reference tokens."""
    h = Harness(overlap, num_blocks=1 + 8, max_num_seqs=3, max_num_batched_tokens=16, enable_prefix_caching=caching)
    prompts = {f"r{i}": prompt(6 + i, seed=10 + i) for i in range(3)}
    requests = [h.add(rid, p, max_tokens=12) for rid, p in prompts.items()]
    rows: dict[str, int] = {}
    while h.sched.has_unfinished():
        h.step()
        for r in requests:
            if r.row is not None:
                assert rows.setdefault(r.request_id, r.row) == r.row, "a row changed"
    streams = h.run()
    reset = [row for s in h.steps for row in s.reset_rows]
    assert reset and h.sched.stats()["preemptions"] == len(reset) and set(reset) <= set(rows.values())
    assert sorted(r.request_id for s in h.steps for r in s.new_rows) == sorted(prompts)  # announced once
    for rid, p in prompts.items():
        assert streams[rid].tokens == reference(p, SamplingParams(max_tokens=12), 256), rid
        assert streams[rid].reason == "length"
    assert h.drained()


def test_preempted_request_goes_back_to_the_front_of_the_queue():
    """The decode that finds no free block preempts the most recently admitted running request, which
    waits ahead of requests that arrived before it was preempted."""
    h = Harness(num_blocks=1 + 4, max_num_seqs=2, max_num_batched_tokens=16)
    old = h.add("old", prompt(7, seed=1), max_tokens=8)
    new = h.add("new", prompt(7, seed=2), max_tokens=8)
    h.add("later", prompt(3, seed=3), max_tokens=2)
    while not h.steps or not h.steps[-1].reset_rows:
        h.step()
    assert h.steps[-1].reset_rows == [new.row]
    assert new.status is RequestStatus.WAITING and new.block_ids == [] and new.num_computed_tokens == 0
    assert list(h.sched.waiting)[:2] == [new, h.sched.requests["later"]]
    assert old.status is RequestStatus.RUNNING
    h.run()
    assert h.drained()


def test_admission_keeps_a_free_block_per_decode():
    """A waiting request is admitted only if a free block stays for each decoding request, so the
    decodes do not preempt it at once."""
    h = Harness(num_blocks=1 + 3, max_num_batched_tokens=16)
    decoding = h.add("decoding", prompt(3, seed=20), max_tokens=5)  # 8 tokens: 2 blocks
    h.step()
    waiting = h.add("waiting", prompt(8, seed=21), max_tokens=1)  # 2 blocks; 2 free, 1 of them kept
    while decoding.status is not RequestStatus.FINISHED:
        assert waiting.status is RequestStatus.WAITING
        h.step()
    streams = h.run()
    assert h.sched.stats()["preemptions"] == 0 and streams["waiting"].reason == "length"
    assert h.drained()


@MODES
def test_abort_of_waiting_running_and_in_flight_requests(overlap):
    """Aborted requests leave at the next schedule with reason "abort" and the given error, their
    rows in that step's freed_rows; a token already computed for one is dropped; the rest goes on."""
    h = Harness(overlap, max_num_seqs=2)
    keep = h.add("keep", prompt(5, seed=1), max_tokens=8)
    running = h.add("running", prompt(5, seed=2), max_tokens=8)
    waiting = h.add("waiting", prompt(5, seed=3), max_tokens=8)
    h.step()
    h.step()
    assert running.status is RequestStatus.RUNNING and waiting.status is RequestStatus.WAITING
    assert running.num_placeholders == (1 if overlap else 0)  # with overlap, a token is in flight
    row = running.row
    h.sched.abort("running", "server shutting down")
    h.sched.abort("waiting")
    step = h.step()
    assert [o.request_id for o in step.finished] == ["running", "waiting"]
    assert step.freed_rows == [row] and not any(c.request is running for c in step.chunks)
    streams = h.run()
    assert (streams["running"].reason, streams["running"].error) == ("abort", "server shutting down")
    assert (streams["waiting"].reason, streams["waiting"].error, streams["waiting"].tokens) == ("abort", None, [])
    assert len(streams["running"].tokens) == (1 if overlap else 2)
    assert streams["keep"].tokens == reference(keep.prompt_ids, keep.params, 256)
    assert h.drained()


@MODES
def test_a_request_waiting_for_its_grammar_is_passed_over_then_admitted_or_refused(overlap):
    """A request whose grammar still compiles is not admitted; those behind it are (no head-of-line
    blocking). Cleared, it is admitted with its reference tokens; refused, it leaves with no output and
    no block or row held, and refusing a request that ran is an error."""
    h = Harness(overlap, max_num_seqs=4)
    slow = h.add("slow", prompt(5, seed=40), max_tokens=6)
    slow.waiting_for_grammar = True
    bad = h.add("bad", prompt(5, seed=41), max_tokens=6)
    bad.waiting_for_grammar = True
    free = h.add("free", prompt(5, seed=42), max_tokens=6)
    for _ in range(3):
        step = h.step()
        assert all(c.request is free for c in step.chunks)
    assert slow.row is None and bad.row is None and h.streams["free"].tokens
    h.sched.refuse("bad")
    assert "bad" not in h.sched.requests and bad.block_ids == []
    slow.waiting_for_grammar = False
    streams = h.run()
    del streams["bad"]  # never started: its client is told by the engine, not by an output
    assert streams["slow"].tokens == reference(slow.prompt_ids, slow.params, 256)
    assert streams["free"].tokens == reference(free.prompt_ids, free.params, 256)
    with pytest.raises(ValueError, match="has run"):
        h.add("ran", prompt(5, seed=43), max_tokens=20)
        h.step()
        h.sched.refuse("ran")
    h.sched.abort("ran")
    h.run()
    assert h.drained()


def test_abort_of_a_request_that_ends_first_is_a_no_op():
    """A request that ends at the update after its abort was asked reports its own finish once; a new
    request reusing its id is not aborted."""
    h = Harness()
    h.add("r", prompt(5, seed=22), max_tokens=1)
    step = h.sched.schedule()
    tokens = h.device.execute(step)
    h.sched.abort("r")
    h.collect(h.sched.update_from_output(step, tokens))
    assert h.streams["r"].reason == "length"
    h.add("r", prompt(5, seed=22), max_tokens=2)
    streams = h.run()
    assert streams["r"].reason == "length" and len(streams["r"].tokens) == 2
    assert not any(s.finished for s in h.steps)


@MODES
def test_stop_token_max_tokens_and_max_len(overlap):
    """A stop token ends with "stop" (unless ignore_eos), max_tokens and max_len with "length"."""
    p = prompt(6, seed=4)
    free_run = reference(p, SamplingParams(max_tokens=10), 256)
    stop = free_run[3]
    h = Harness(overlap, max_model_len=11)
    h.add("stop", p, max_tokens=10, stop_token_ids=[stop])
    h.add("ignore", p, max_tokens=4, stop_token_ids=[stop], ignore_eos=True)
    h.add("max_tokens", p, max_tokens=3)
    h.add("max_len", p, max_tokens=10)
    streams = h.run()
    assert (streams["stop"].tokens, streams["stop"].reason) == (free_run[: free_run.index(stop) + 1], "stop")
    assert (streams["ignore"].tokens, streams["ignore"].reason) == (free_run[:4], "length")
    assert (streams["max_tokens"].tokens, streams["max_tokens"].reason) == (free_run[:3], "length")
    assert (streams["max_len"].tokens, streams["max_len"].reason) == (free_run[:5], "length")
    assert h.drained()


MAX_TOKENS = {f"r{i}": 4 + i % 5 for i in range(10)}


def test_overlap_gives_the_sync_streams():
    """Reading each step's tokens one step later (placeholders, from_previous decodes) gives exactly
    the synchronous token streams, under preemption, stop tokens and prefix caching; the token computed
    after a stop is dropped, and no request is sampled past max_tokens."""
    def workload(overlap: bool) -> Harness:
        h = Harness(overlap, num_blocks=1 + 14, max_num_seqs=4, max_num_batched_tokens=12)
        shared = prompt(9, seed=99)
        for i, rid in enumerate(MAX_TOKENS):
            p = (shared if i % 2 else []) + prompt(3 + 2 * i, seed=i)
            h.add(rid, p, max_tokens=MAX_TOKENS[rid], stop_token_ids=[7, 11, 13, 17, 19])
        return h

    sync, overlap = workload(False), workload(True)
    sync_streams, overlap_streams = sync.run(), overlap.run()
    assert overlap_streams == sync_streams
    assert any(s.reason == "stop" for s in sync_streams.values())
    assert sync.sched.stats()["preemptions"] and overlap.sched.stats()["preemptions"]
    assert not any(c.from_previous for s in sync.steps for c in s.chunks)
    assert any(c.from_previous and c.token_ids == [] for s in overlap.steps for c in s.chunks)
    for h in (sync, overlap):
        for rid, req_max in MAX_TOKENS.items():
            assert h.device.samples[rid] <= req_max
    dropped = {rid: overlap.device.samples[rid] - len(s.tokens) for rid, s in overlap_streams.items()}
    assert all(sync.device.samples[rid] == len(s.tokens) for rid, s in sync_streams.items())
    assert any(dropped.values()) and all(n == 0 or overlap_streams[rid].reason == "stop" for rid, n in dropped.items())
    assert sync.drained() and overlap.drained()


@MODES
def test_prefix_cache_reuses_a_finished_requests_blocks(overlap):
    """A second request with the same prompt prefix takes the cached full blocks: they count as
    computed, num_cached_tokens and the hit counter say so, and its tokens are unchanged."""
    h = Harness(overlap)
    first = prompt(14, seed=5)
    h.add("first", first, max_tokens=3)
    h.run()
    second = first[:10] + prompt(4, seed=6)
    h.add("second", second, max_tokens=3)
    streams = h.run()
    assert streams["first"].cached == 0 and streams["second"].cached == 8  # blocks 0 and 1
    admission = next(c for s in h.steps for c in s.prefills if c.request.request_id == "second")
    assert (admission.start, admission.num_tokens) == (8, 6)
    stats = h.sched.stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (28, 8)
    assert streams["second"].tokens == reference(second, SamplingParams(max_tokens=3), 256)
    assert h.drained()


@pytest.mark.parametrize("length,start", [(9, 8), (8, 4)])
def test_whole_prompt_hit_still_computes_the_last_token(length, start):
    """Even when every full block of the prompt is cached, the last token is computed (it yields the
    logits): a prompt ending on a block boundary recomputes its last block."""
    h = Harness()
    p = prompt(length, seed=7)
    h.add("a", p, max_tokens=2)
    h.run()
    h.add("b", p, max_tokens=2)
    streams = h.run()
    admission = next(c for s in h.steps for c in s.prefills if c.request.request_id == "b")
    assert (admission.start, admission.end, admission.sample) == (start, length, True)
    assert streams["b"].cached == start and streams["b"].tokens == streams["a"].tokens
    assert h.drained()


def test_multi_turn_reuses_the_reply():
    """The next turn (history + reply + new message) finds the previous reply's full blocks too."""
    h = Harness()
    history = prompt(10, seed=8)
    h.add("t1", history, max_tokens=9)
    reply = h.run()["t1"].tokens
    turn2 = history + reply + prompt(3, seed=9)
    h.add("t2", turn2, max_tokens=2)
    streams = h.run()
    # Computed through the token before the last reply token: (10 + 9 - 1) // 4 full blocks.
    assert streams["t2"].cached == 16
    assert streams["t2"].tokens == reference(turn2, SamplingParams(max_tokens=2), 256)
    assert h.drained()


def test_different_cache_salt_never_shares():
    """The same tokens under another salt (another RoPE) are other keys."""
    h = Harness()
    p = prompt(12, seed=10)
    h.add("a", p, salt=(10000.0, 1.0), max_tokens=2)
    h.run()
    h.add("b", p, salt=(30000.0, 1.2), max_tokens=2)
    streams = h.run()
    assert streams["b"].cached == 0 and h.sched.stats()["prefix_cache_hits"] == 0
    assert streams["b"].tokens == reference(p, SamplingParams(max_tokens=2), 256, salt=(30000.0, 1.2))
    assert h.drained()


def test_blocks_shared_by_running_requests_are_not_evicted():
    """Two running requests share cached blocks (reference count 2); other requests filling the cache
    never get them, and both keep producing their reference tokens."""
    h = Harness(num_blocks=1 + 12, max_num_batched_tokens=16)
    p = prompt(9, seed=11)
    h.add("a", p, max_tokens=2)
    h.run()
    a2 = h.add("a2", p, max_tokens=6)
    b = h.add("b", p, max_tokens=6)
    h.step()
    shared = a2.block_ids[:2]
    assert b.block_ids[:2] == shared and [h.sched.pool.ref_count(x) for x in shared] == [2, 2]
    h.add("filler", prompt(20, seed=12), max_tokens=4)
    streams = h.run()
    assert streams["a2"].tokens == streams["b"].tokens == reference(p, SamplingParams(max_tokens=6), 256)
    assert streams["filler"].tokens == reference(prompt(20, seed=12), SamplingParams(max_tokens=4), 256)
    assert h.peak_usage == 1.0 and h.drained()


def test_least_recently_freed_prefix_is_evicted_first():
    """When blocks run out, the cached blocks freed longest ago go first: the older prompt's prefix is
    gone, the newer one's still hits."""
    h = Harness(num_blocks=1 + 8, max_num_batched_tokens=32)
    older, newer = prompt(9, seed=13), prompt(9, seed=14)
    h.add("older", older, max_tokens=1)
    h.run()
    h.add("newer", newer, max_tokens=1)
    h.run()
    h.add("filler", prompt(22, seed=15), max_tokens=1)  # 6 blocks: the 4 holding nothing cached, then older's 2
    h.run()
    h.add("newer-again", newer, max_tokens=1)
    h.add("older-again", older, max_tokens=1)
    streams = h.run()
    assert streams["older-again"].cached == 0 and streams["newer-again"].cached == 8


@MODES
def test_failed_sampling_ends_that_request_alone(overlap):
    """A token the device could not sample (None) ends its request with an error; others go on."""
    h = Harness(overlap, fail={("bad", 2)})
    bad = h.add("bad", prompt(5, seed=16), max_tokens=6)
    good = h.add("good", prompt(5, seed=17), max_tokens=6)
    streams = h.run()
    assert (streams["bad"].reason, streams["bad"].error) == ("error", SAMPLING_FAILED)
    assert streams["bad"].tokens == reference(bad.prompt_ids, bad.params, 256)[:2]
    assert streams["good"].tokens == reference(good.prompt_ids, good.params, 256)
    assert h.drained()


@MODES
def test_fail_and_fail_all(overlap):
    """fail() ends the given requests with "error" (their rows freed at the next schedule, a token in
    flight dropped); fail_all() ends the rest, waiting ones included."""
    h = Harness(overlap, max_num_seqs=1)
    a = h.add("a", prompt(5, seed=18), max_tokens=8)
    h.add("b", prompt(5, seed=19), max_tokens=8)
    h.step()
    h.collect(h.sched.fail([a], "generation failed: boom"))
    assert h.streams["a"].error == "generation failed: boom" and h.sched.fail([a], "again") == []
    step = h.step()
    assert step.freed_rows == [a.row]
    h.collect(h.sched.fail_all("engine died"))
    assert (h.streams["b"].reason, h.streams["b"].error) == ("error", "engine died")
    h.run()
    assert h.drained()


def test_config_checks():
    """Inconsistent capacity settings are refused with the setting named."""
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, block_size=4, num_blocks=10, max_model_len=16)
    with pytest.raises(ValueError, match="num_blocks"):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4, block_size=4, num_blocks=1, max_model_len=16)
    assert SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=4, block_size=4, num_blocks=10,
                           max_model_len=16).num_rows == 6
