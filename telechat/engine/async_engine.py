"""The asyncio face of the engine, which the API and the CLI code against: ``generate`` (an async
iterator of :class:`~telechat.engine.request.RequestOutput`), ``abort``, ``abort_all``, ``stats``,
``shutdown``, ``alive``, ``info``.

Two engines offer it (:class:`EngineFront`): :class:`AsyncEngine` steps the engine in a thread of
this process; :class:`~telechat.engine.core_client.EngineClient` talks to the engine core in a
process of its own (docs/engine.md, "Processes"). Both run the same
:class:`~telechat.engine.core_process.CoreLoop` and deliver its output batches here, from a thread,
to the per-request queues of the coroutines that consume them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator

from telechat.engine.core_messages import (
    AbortAll,
    AbortRequests,
    AddRequest,
    ClientMessage,
    ControlReply,
    EngineInfo,
    LoadLoraAdapter,
    OutputBatch,
    Shutdown,
    UnloadLoraAdapter,
)
from telechat.engine.core_process import CoreLoop, engine_info
from telechat.engine.request import RequestOutput
from telechat.engine.sampling import SamplingParams
from telechat.errors import RequestRefused

log = logging.getLogger(__name__)


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    """One output carrying the new tokens of several consecutive outputs of a request."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    first = next((out for out in outputs if out.queue_s is not None), last)  # the first token's, if here
    tokens = [t for out in outputs for t in out.new_token_ids]
    return RequestOutput(last.request_id, tokens, finished=last.finished, finish_reason=last.finish_reason,
                         num_prompt_tokens=last.num_prompt_tokens, num_output_tokens=last.num_output_tokens,
                         error=last.error, num_cached_tokens=max(out.num_cached_tokens for out in outputs),
                         logprobs=[lp for out in outputs for lp in out.logprobs or []] or None,
                         queue_s=first.queue_s, prefill_s=first.prefill_s)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)


def _resolve(future: asyncio.Future, reply: ControlReply) -> None:
    if not future.done():
        future.set_result(reply)


class EngineDeadError(RuntimeError):
    """The engine stopped; no request can be served."""


class EngineFront:
    """Streams of requests over an engine that runs elsewhere (a thread or a process).

    Subclasses give the transport: :meth:`_send` a message to the engine's :class:`CoreLoop`, and call
    :meth:`_deliver` (from any thread) with each batch it produces, and :meth:`_end_streams` if it stops.
    """

    def __init__(self) -> None:
        self.info: EngineInfo | None = None
        """Context length, KV capacity and vocabulary size of the engine (set once it is ready)."""
        self._stats: dict = {}
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._calls: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lora: dict[str, str] | None = None

    # ------------------------------------------------------------------ transport (subclasses)

    @property
    def alive(self) -> bool:
        """True while the engine serves requests."""
        raise NotImplementedError

    @property
    def stopped_reason(self) -> str | None:
        """Why the engine no longer serves (one line for the user); None while it is alive."""
        raise NotImplementedError

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Let running requests finish for up to ``grace_s`` seconds, abort the rest, stop the engine."""
        raise NotImplementedError

    def wait_ready(self) -> None:
        """Block until the engine serves requests (or raise why it cannot)."""

    def _send(self, msg: ClientMessage) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ requests

    def stats(self) -> dict:
        """The engine's figures after its latest step (cheap: nothing waits for the engine)."""
        return dict(self._stats)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, after: str | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (``lora``: run with that loaded adapter); leaving the loop early (or
        cancellation) aborts it.

        Outputs that queued up while the consumer was busy arrive merged into one (several tokens),
        so a slow client or a busy event loop costs one update per wake-up, not one per token. A
        request the engine refuses raises :class:`~telechat.errors.RequestRefused` (a ``ValueError``);
        if the engine stops, the stream ends with finish reason ``error`` and the reason.
        """
        if not self.alive:
            raise EngineDeadError(self.stopped_reason or "the engine has stopped")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), stream)
        finished = False
        try:
            self._send(AddRequest(rid, list(prompt_ids), params, after, lora))
            while True:
                items = [await stream.get()]
                while not stream.empty():  # a consumer that fell behind gets one merged update
                    items.append(stream.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        finished = True  # refused: it never started
                        raise item
                item = _merge(items)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)
            self._streams.pop(rid, None)

    # ------------------------------------------------------------------ LoRA adapters

    @property
    def lora_adapters(self) -> dict[str, str]:
        """The LoRA adapters requests may name: name -> folder (those loaded at start, then as changed
        through :meth:`load_lora_adapter` / :meth:`unload_lora_adapter`)."""
        if self._lora is None:
            self._lora = dict(self.info.lora_adapters) if self.info is not None else {}
        return self._lora

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Load the adapter folder ``path`` as ``name`` in the engine; ``ValueError`` says why it cannot be."""
        reply = await self._control(lambda cid: LoadLoraAdapter(cid, name, path))
        if reply.error is not None:
            raise ValueError(reply.error)

    async def unload_lora_adapter(self, name: str) -> None:
        """Unload the adapter ``name``; ``KeyError`` when no adapter has that name."""
        reply = await self._control(lambda cid: UnloadLoraAdapter(cid, name))
        if reply.error is not None:
            raise (KeyError if reply.not_found else ValueError)(reply.error)

    async def _control(self, make) -> ControlReply:
        """Send the message ``make(call_id)`` and wait for the engine's reply."""
        if not self.alive:
            raise EngineDeadError(self.stopped_reason or "the engine has stopped")
        cid = f"call-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls[cid] = (loop, future)
        try:
            self._send(make(cid))
            return await future
        finally:
            self._calls.pop(cid, None)

    def abort(self, request_id: str) -> None:
        """Abort a request at the next step boundary."""
        self._send(AbortRequests([request_id]))

    def abort_all(self, error: str) -> None:
        """Abort every request submitted so far at the next step boundary; each stream then ends
        with finish reason ``abort`` and ``error`` (e.g. "the server is shutting down")."""
        self._send(AbortAll(error))

    # ------------------------------------------------------------------ delivery (any thread)

    def _deliver(self, batch: OutputBatch) -> None:
        """Hand a batch's outputs to their streams, one callback per event loop."""
        self._stats = batch.stats
        if batch.lora_adapters is not None:  # an adapter was loaded or unloaded (maybe by another API process)
            self._lora = dict(batch.lora_adapters)
        for cid, reply in batch.replies.items():
            call = self._calls.get(cid)
            if call is not None:
                try:
                    call[0].call_soon_threadsafe(_resolve, call[1], reply)
                except RuntimeError:  # that event loop is closed: nobody waits for the reply
                    pass
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for rid, item in [(out.request_id, out) for out in batch.outputs] + \
                [(rid, RequestRefused(why)) for rid, why in batch.rejected.items()]:
            target = self._streams.get(rid)
            if target is not None:
                by_loop[target[0]].append((target[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody reads these streams any more
                self._send(AbortRequests([item.request_id for _, item in items if isinstance(item, RequestOutput)]))

    def _end_streams(self, reason: str) -> None:
        """End every open stream with finish reason ``error`` and ``reason`` (the engine stopped)."""
        ends = [RequestOutput(rid, [], finished=True, finish_reason="error", error=reason)
                for rid in list(self._streams)]
        self._deliver(OutputBatch(ends, {}, self._stats, {cid: ControlReply(reason) for cid in list(self._calls)}))


class AsyncEngine(EngineFront):
    """The engine stepped by a thread of this process (tests, the CLI): same loop as the core process, no IPC."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine
        self.info, self._stats = engine_info(engine), engine.stats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="telechat-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive() and not self._stopping

    @property
    def stopped_reason(self) -> str | None:
        """Why the engine no longer serves; None while it is alive."""
        if self.alive:
            return None
        return "the engine was shut down" if self._stopping else "the engine thread stopped; restart the server"

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Let running requests finish for up to ``grace_s`` seconds, abort the rest, stop the thread."""
        self._stopping = True
        self._send(Shutdown(grace_s))
        self._thread.join(timeout=grace_s + 10)

    def _send(self, msg: ClientMessage) -> None:
        self._inbox.put(msg)

    def _receive(self, timeout_s: float) -> list[ClientMessage]:
        messages = []
        try:
            messages.append(self._inbox.get(timeout=timeout_s) if timeout_s else self._inbox.get_nowait())
            while True:
                messages.append(self._inbox.get_nowait())
        except queue.Empty:
            return messages

    def _run(self) -> None:
        try:
            CoreLoop(self.engine).run(self._receive, self._deliver)
            log.info("engine thread stopped")
        except Exception:  # noqa: BLE001 - logged; the streams end below and alive turns false
            log.exception("the engine failed")
        finally:
            self._end_streams("the engine stopped")
