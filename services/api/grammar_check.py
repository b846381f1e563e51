"""The API's check of a structured-output grammar, off the event loop and with a time limit.

Building an xgrammar grammar usually takes milliseconds, but some small inputs take minutes: with
xgrammar 0.2.9 a JSON schema ``{"type": "string", "pattern": "[0-9a-f]{1,50000}"}`` took 478 s to build
(``{1,3000}``: 1.1 s). Run on the event loop, that froze every stream of the API process and ``/health``.
So the check runs in a worker process (a few, started on first use and kept): a check past the limit
kills its worker (nothing keeps burning a core) and refuses the request with a 400, while other
requests — constrained ones too, on the other workers — go on. Grammars that passed are remembered, so
a client sending the same schema every time (a tool list, say) is answered without a worker.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from telechat.engine.guided import GrammarError, GrammarSpec

log = logging.getLogger(__name__)

WORKERS = 2
"""Worker processes one API process checks grammars in, at most (each holds xgrammar, ~300 MB)."""
START_TIMEOUT_S = 120.0
"""A worker that has not imported xgrammar by then is broken."""
PASSED_KEPT_BYTES = 16 << 20
"""Grammars that passed are remembered (LRU, up to this much of their text) so that they are not checked again."""


def _serve(conn: Connection) -> None:
    """A worker: check each spec it is sent; answer None (it builds) or why it cannot be used."""
    from telechat.engine.guided import check_grammar

    conn.send("ready")
    while True:
        try:
            spec = conn.recv()
        except EOFError:  # the API process is gone
            return
        try:
            check_grammar(spec)
            conn.send(None)
        except GrammarError as e:
            conn.send(str(e))


class _Worker:
    """One worker process and the API's end of its pipe."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), name="telechat-grammar-check", daemon=True)
        self.proc.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class GrammarChecker:
    """Checks grammar specs in worker processes, each check limited to ``timeout_s`` seconds."""

    def __init__(self, timeout_s: float, workers: int = WORKERS):
        self.timeout_s = timeout_s
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None
        self._workers = workers
        self._waits = ThreadPoolExecutor(workers, thread_name_prefix="grammar-check")
        self._passed: OrderedDict[tuple[str, str], int] = OrderedDict()
        """Specs that passed -> the length of their text."""
        self._passed_bytes = 0

    async def check(self, spec: GrammarSpec) -> None:
        """Return if ``spec`` builds within the limit; raise :class:`GrammarError` saying why it cannot be used
        (it does not build, it takes too long, or it crashed the worker)."""
        if spec.key in self._passed:
            self._passed.move_to_end(spec.key)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        async with self._slots:
            worker = self._idle.pop() if self._idle else _Worker()
            try:
                why = await self._run(worker, spec)
            except BaseException:
                worker.kill()
                raise
            self._idle.append(worker)
        if why is not None:
            raise GrammarError(why)
        if spec.key not in self._passed:
            self._passed[spec.key] = size = len(spec.kind) + len(spec.value)
            self._passed_bytes += size
            while self._passed_bytes > PASSED_KEPT_BYTES:
                self._passed_bytes -= self._passed.popitem(last=False)[1]

    async def _run(self, worker: _Worker, spec: GrammarSpec) -> str | None:
        loop = asyncio.get_running_loop()
        if not worker.ready:  # its start (importing xgrammar) is not part of any grammar's time
            started = await loop.run_in_executor(self._waits, worker.conn.poll, START_TIMEOUT_S)
            try:
                if not started or worker.conn.recv() != "ready":
                    raise EOFError
            except EOFError:
                raise RuntimeError(f"the grammar check process did not start (exit code {worker.proc.exitcode}); "
                                   "see the server log") from None
            worker.ready = True
        start = time.monotonic()
        worker.conn.send(spec)
        if not await loop.run_in_executor(self._waits, worker.conn.poll, self.timeout_s):
            log.warning("a grammar took over %g s to build; its check process was stopped", self.timeout_s)
            raise GrammarError(f"it takes longer than {self.timeout_s:g} s to build; simplify it (long bounded "
                               "repetitions such as {1,5000} are the usual cause)")
        try:
            why = worker.conn.recv()
        except EOFError:  # the process died building it (xgrammar crashed)
            log.warning("building a grammar crashed its check process (exit code %s)", worker.proc.exitcode)
            raise GrammarError("building it crashed the grammar checker") from None
        log.debug("grammar checked in %.3f s", time.monotonic() - start)
        return why

    def close(self) -> None:
        """Stop the idle workers (a check still running stops its own on the way out)."""
        for worker in self._idle:
            worker.kill()
        self._idle.clear()
        self._waits.shutdown(wait=False, cancel_futures=True)

