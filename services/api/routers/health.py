"""Liveness, readiness and metrics; open without an API key (``/metrics`` needs it with
``METRICS_REQUIRE_KEY``)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from services.api.deps import StateDep, require_metrics_key
from services.api.metrics import CONTENT_TYPE
from services.api.protocol.openai import ErrorResponse

router = APIRouter(tags=["operations"])


class HealthStatus(BaseModel):
    status: Literal["ok", "engine_dead"]


class ReadyStatus(BaseModel):
    status: Literal["ready", "loading", "failed", "shutting_down"]
    model: str | None = None
    error: str | None = None


@router.get("/health", response_model=HealthStatus,
            responses={503: {"model": HealthStatus, "description": "the engine stopped"}})
async def health(state: StateDep) -> JSONResponse:
    """200 while the process serves HTTP (also while the model loads); 503 once the engine stopped."""
    if state.runtime is not None and not state.runtime.engine.alive:
        return JSONResponse({"status": "engine_dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=ReadyStatus, response_model_exclude_none=True,
            responses={503: {"model": ReadyStatus,
                             "description": "loading, failed to load, engine stopped, or shutting down"}})
async def ready(state: StateDep) -> JSONResponse:
    """200 with the model id once the model is loaded; 503 while loading, after a failed load, once
    the engine has stopped, and once shutdown has begun (load balancers stop sending new requests)."""
    if state.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if state.runtime is not None and not state.runtime.engine.alive:
        return JSONResponse({"status": "failed", "error": state.runtime.engine.stopped_reason}, status_code=503)
    if state.runtime is not None:
        return JSONResponse({"status": "ready", "model": state.runtime.name})
    if state.load_error:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_metrics_key)],
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"},
                       401: {"model": ErrorResponse, "description": "with METRICS_REQUIRE_KEY and a wrong key"}})
async def metrics(state: StateDep) -> Response:
    """Prometheus text format (``telechat:*``)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
