"""Server state and the typed dependencies routers use (``StateDep``, ``RuntimeDep``, API-key check)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from services.api.grammar_check import GrammarChecker
from services.api.metrics import Metrics
from services.api.protocol.openai import APIError
from services.api.settings import Settings

if TYPE_CHECKING:
    from telechat.engine.core_process import CoreAddress
    from telechat.runtime import Runtime

log = logging.getLogger("services.api")

RETRY_AFTER_S = 1
"""Retry-After on 429: on a busy server a slot usually frees within a second."""
SHUTTING_DOWN = "the server is shutting down"
"""The error that ends requests still running when the shutdown grace period is over."""


class ServerState:
    """What the app holds: settings, metrics, the runtime once loaded, and the in-flight count."""

    def __init__(self, settings: Settings, core: CoreAddress | None = None, admitted: Any = None):
        """``core``: this is one of ``settings.api_server_count`` API processes over the engine core there;
        ``admitted``: then the count of requests in flight in all of them (a ``multiprocessing.Value``)."""
        self.settings = settings
        self.core = core
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.in_flight = 0
        """Requests in flight in this process."""
        self._admitted = admitted
        self.draining = False
        self.metrics = Metrics(lambda: self.runtime.engine.stats() if self.runtime else None,
                               multiprocess=core is not None)
        self.grammars = GrammarChecker(settings.grammar_timeout_s)
        """Checks structured-output grammars before requests are queued (services/api/grammar_check.py)."""
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the serving event loop (for :meth:`begin_shutdown`, called from a signal handler)."""
        self._loop = loop

    def begin_shutdown(self) -> None:
        """Stop admitting requests now; after ``shutdown_grace_s`` end the ones still running with
        :data:`SHUTTING_DOWN` (each stream then closes with an error event and its proper end)."""
        if self.draining or self._loop is None:
            return
        self.draining = True
        grace = self.settings.shutdown_grace_s
        log.info("shutting down: running requests get %d s to finish (%d in flight)", grace, self.in_flight)
        self._loop.call_soon_threadsafe(self._loop.call_later, grace, self._end_running)

    def _end_running(self) -> None:
        if self.runtime is not None and self.in_flight:
            log.info("shutdown grace period over: ending %d running requests", self.in_flight)
            self.runtime.engine.abort_all(SHUTTING_DOWN)

    @property
    def capacity(self) -> int:
        """Requests the server admits at once: the batch plus the bounded waiting queue (with several API
        processes, counted over all of them: a connection landing on a busy process is not refused while
        the server has room)."""
        return self.settings.max_num_seqs + self.settings.max_queue

    def admit(self) -> None:
        """Take a slot, or raise 503 while shutting down and 429 (with ``Retry-After``) when the queue is full."""
        if self.draining:
            raise APIError(503, f"{SHUTTING_DOWN}; send the request again (to another instance)",
                           type="service_unavailable_error", code="shutting_down")
        total = self._take_slot()
        if total is not None:
            raise APIError(429, f"the server is at capacity ({total} requests in flight = MAX_NUM_SEQS "
                           f"{self.settings.max_num_seqs} + MAX_QUEUE {self.settings.max_queue}); retry later",
                           type="rate_limit_error", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1

    def _take_slot(self) -> int | None:
        """Count one more request in flight; when the server is full, the count instead (nothing taken)."""
        if self._admitted is None:
            return self.in_flight if self.in_flight >= self.capacity else None
        with self._admitted.get_lock():
            if self._admitted.value >= self.capacity:
                return self._admitted.value
            self._admitted.value += 1
        return None

    def release(self) -> None:
        """Give a slot back."""
        self.in_flight -= 1
        if self._admitted is not None:
            with self._admitted.get_lock():
                self._admitted.value -= 1


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]


def get_runtime(state: StateDep) -> Runtime:
    """The loaded runtime, or 503 while it loads (or after it failed to load)."""
    if state.runtime is None:
        detail = f"the model failed to load: {state.load_error}" if state.load_error else \
            "the model is still loading; retry when GET /ready answers 200"
        raise APIError(503, detail, type="service_unavailable_error", code="model_not_ready",
                       headers={"Retry-After": "5"})
    if not state.runtime.engine.alive:
        raise APIError(503, state.runtime.engine.stopped_reason or "the engine has stopped; restart the server",
                       type="service_unavailable_error", code="engine_dead")
    return state.runtime


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]


_BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API_KEY>`, when the server has an "
                     "API key. The scheme is case-insensitive and surrounding whitespace is ignored.")


def _check_key(request: Request, key: str) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>``.

    Lenient on purpose about the form (RFC 9110: the scheme is case-insensitive; extra spaces
    around the token are ignored), strict about the key (constant-time comparison)."""
    challenge = {"WWW-Authenticate": 'Bearer realm="telechat"'}
    parts = request.headers.get("authorization", "").split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <API_KEY>'",
                       type="authentication_error", code="invalid_api_key", headers=challenge)
    if not secrets.compare_digest(parts[1].encode(), key.encode()):
        raise APIError(401, "incorrect API key", type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="telechat", error="invalid_token"'})


def require_api_key(request: Request, state: StateDep, _: Annotated[object, Depends(_BEARER)] = None) -> None:
    """With ``API_KEY`` set, demand ``Authorization: Bearer <key>`` (401 with ``WWW-Authenticate`` otherwise)."""
    if state.settings.api_key:
        _check_key(request, state.settings.api_key)


def require_metrics_key(request: Request, state: StateDep) -> None:
    """Like :func:`require_api_key` for ``/metrics``, when ``METRICS_REQUIRE_KEY`` is on."""
    if state.settings.api_key and state.settings.metrics_require_key:
        _check_key(request, state.settings.api_key)
