"""Server state and the typed dependencies routers use (``StateDep``, ``RuntimeDep``, API-key check)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from services.api.metrics import Metrics
from services.api.protocol.openai import APIError
from services.api.settings import Settings

if TYPE_CHECKING:
    from telechat.runtime import Runtime

RETRY_AFTER_S = 1
"""Retry-After on 429: on a busy server a slot usually frees within a second."""


class ServerState:
    """What the app holds: settings, metrics, the runtime once loaded, and the in-flight count."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.in_flight = 0
        self.metrics = Metrics(lambda: self.runtime.engine.stats() if self.runtime else None)

    @property
    def capacity(self) -> int:
        """Requests admitted at once: the batch plus the bounded waiting queue."""
        return self.settings.max_num_seqs + self.settings.max_queue

    def admit(self) -> None:
        """Take a slot or raise 429 (with ``Retry-After``) when the queue is full."""
        if self.in_flight >= self.capacity:
            raise APIError(429, f"the server is at capacity ({self.in_flight} requests in flight = MAX_NUM_SEQS "
                           f"{self.settings.max_num_seqs} + MAX_QUEUE {self.settings.max_queue}); retry later",
                           type="rate_limit_error", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1

    def release(self) -> None:
        """Give a slot back."""
        self.in_flight -= 1


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
        raise APIError(503, "the engine has stopped; restart the server", type="service_unavailable_error",
                       code="engine_dead")
    return state.runtime


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]


def require_api_key(request: Request, state: StateDep) -> None:
    """With ``API_KEY`` set, demand ``Authorization: Bearer <key>`` (401 otherwise)."""
    key = state.settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <API_KEY>'",
                       type="authentication_error", code="invalid_api_key")
    if not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "incorrect API key", type="authentication_error", code="invalid_api_key")
