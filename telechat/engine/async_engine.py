"""Asyncio front of the engine: a background thread steps :class:`LLMEngine` while coroutines
submit requests, stream their outputs and abort them (client disconnects)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from telechat.engine.engine import LLMEngine, RequestOutput
from telechat.engine.sampling import SamplingParams

log = logging.getLogger(__name__)


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    """One output carrying the new tokens of several consecutive outputs of a request."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    tokens = [t for out in outputs for t in out.new_token_ids]
    return RequestOutput(last.request_id, tokens, finished=last.finished, finish_reason=last.finish_reason,
                         num_prompt_tokens=last.num_prompt_tokens, num_output_tokens=last.num_output_tokens,
                         error=last.error)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


class AsyncEngine:
    """Thread-driven engine usable from asyncio: ``generate`` / ``abort`` / ``stats``."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending = 0  # requests submitted but not yet seen by the engine thread
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="telechat-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive()

    def stats(self) -> dict:
        """Engine figures plus requests not yet admitted to the engine."""
        s = dict(self.engine.stats())
        s["waiting"] += self._pending
        return s

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early (or cancellation) aborts it.

        Outputs that queued up while the consumer was busy arrive merged into one (several tokens),
        so a slow client or a busy event loop costs one update per wake-up, not one per token.
        """
        if not self.alive:
            raise EngineDeadError("the engine has stopped")
        rid = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), stream)
        self._pending += 1
        self._commands.put(("add", rid, list(prompt_ids), params))
        self._wake.set()
        finished = False
        try:
            while True:
                items = [await stream.get()]
                while not stream.empty():  # a consumer that fell behind gets one merged update
                    items.append(stream.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
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

    def abort(self, request_id: str) -> None:
        """Abort a request at the next step boundary."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def abort_all(self, error: str) -> None:
        """Abort every request submitted so far at the next step boundary; each stream then ends
        with finish reason ``abort`` and ``error`` (e.g. "the server is shutting down")."""
        self._commands.put(("abort_all", error))
        self._wake.set()

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Let running requests finish for up to ``grace_s`` seconds, abort the rest, stop the thread."""
        deadline = time.monotonic() + grace_s
        while self.engine.has_unfinished() and time.monotonic() < deadline and self.alive:
            time.sleep(0.05)
        for rid in list(self.engine.requests):
            self.abort(rid)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the client's event loop is closed
                self.engine.abort(rid)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                self._pending -= 1
                if rid not in self._streams:  # cancelled before it reached the engine
                    continue
                try:
                    self.engine.add_request(prompt, params, rid)
                except ValueError as e:
                    self._deliver(rid, e)
            elif cmd[0] == "abort_all":
                for rid in list(self.engine.requests):
                    self.engine.abort(rid, cmd[1])
            else:
                self.engine.abort(cmd[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # noqa: BLE001 - keep serving; fail what was in flight
                log.exception("engine step failed")
                outputs = [self.engine._finish(s, "error", error="internal engine error")
                           for s in list(self.engine.requests.values())]
            for out in outputs:
                self._deliver(out.request_id, out)
        log.info("engine thread stopped")
