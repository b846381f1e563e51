"""Liveness, readiness and metrics; always open (no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from services.api.deps import StateDep
from services.api.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(state: StateDep) -> JSONResponse:
    """200 while the process serves HTTP (also while the model loads); 503 once the engine thread died."""
    if state.runtime is not None and not state.runtime.engine.alive:
        return JSONResponse({"status": "engine_dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(state: StateDep) -> JSONResponse:
    """200 with the model id once the model is loaded; 503 while loading or after a failed load."""
    if state.runtime is not None:
        return JSONResponse({"status": "ready", "model": state.runtime.name})
    if state.load_error:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    """Prometheus text format (``telechat:*``)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
