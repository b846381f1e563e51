"""The app (``create_app``: routers, middleware, every exception handler, lifespan) and ``main``,
the ``telechat serve`` entry point.

Status codes: 400 bad input (validation, JSON, prompt or max_tokens beyond the context), 401 API
key (with ``WWW-Authenticate``), 404 unknown model or route, 405 method, 413 body over
``MAX_BODY_BYTES``, 429 queue full (``Retry-After``), 503 model not loaded yet, engine process
stopped, or shutting down, 500 only for a failed generation or a bug (sent with ``Connection:
close``). The model runs in the engine core process (telechat/engine/core_process.py). OpenAI and
operational routes answer ``{"error": {"message", "type", "param", "code"}}``; legacy routes answer
the official body with its codes (see ``protocol/legacy.py``), except 401 and 413, which keep the
OpenAI body everywhere because they are decided before any route is known.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services import settings_cli
from services.api.deps import ServerState
from services.api.protocol.legacy import FAILED, MISSING, LegacyError, code_for
from services.api.protocol.openai import APIError
from services.api.routers import docs, health, legacy, lora, openai, tokenize
from services.api.settings import MAX_BODY_BYTES, Settings, get_settings
from telechat.engine.core_client import EngineStartError
from telechat.errors import UserError
from telechat.heap import freeze_startup_heap, thaw_startup_heap
from telechat.model.checkpoint import first_line

if TYPE_CHECKING:
    from telechat.engine.core_process import CoreAddress
    from telechat.model.checkpoint import CheckpointInfo

log = logging.getLogger("services.api")
LEGACY_PREFIX = "/telechat/"


# ---------------------------------------------------------------------------------------------- model loading

def engine_options(settings: Settings) -> tuple[CheckpointInfo, dict]:
    """The configured checkpoint (the built-in demo when none is; made here if needed) and the engine
    options of :func:`telechat.runtime.engine_spec` / ``Runtime.load``."""
    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.engine.core import EngineConfig
    from telechat.runtime import lora_slot_rank, resolve_model_path

    path, _ = resolve_model_path(settings.model_path)
    info = inspect_checkpoint(path, need_tokenizer=True)
    config = EngineConfig(max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len,
                          max_num_batched_tokens=settings.max_num_batched_tokens,
                          enable_prefix_caching=settings.prefix_caching, kv_cache_dtype=settings.kv_cache_dtype,
                          gpu_memory_utilization=settings.gpu_memory_utilization,
                          max_loras=settings.max_loras if settings.lora_enabled else 0,
                          max_lora_rank=lora_slot_rank(settings.lora_module_map, settings.max_lora_rank),
                          grammar_timeout_s=settings.grammar_timeout_s)
    return info, dict(device=settings.device, dtype=settings.dtype, engine_config=config, lora=settings.lora_path,
                      lora_modules=settings.lora_module_map, rope_mode=settings.rope_mode,
                      training_seqlen=settings.training_seqlen, base_seqlen=settings.base_seqlen)


def load_runtime(settings: Settings, core: CoreAddress | None = None):
    """Load the configured model's tokenizer and start its engine (or join the engine core at ``core``)."""
    from telechat.runtime import Runtime

    info, options = engine_options(settings)
    names = settings.served_names
    return Runtime.load(info, name=info.served_name(names[0] if names else None), aliases=names[1:],
                        content_markers=settings.content_markers, core=core, **options)


def _load_in_background(state: ServerState, on_fatal: Callable[[], None] | None) -> None:
    t0 = time.perf_counter()
    try:
        runtime = load_runtime(state.settings, state.core)
    except Exception as e:  # noqa: BLE001 - reported by /ready and the exit code
        if state.core is not None and isinstance(e, (UserError, EngineStartError)):
            log.debug("loading the model failed: %s", e)  # the supervising process says why, once
        elif isinstance(e, (UserError, EngineStartError)):  # one line: a folder or setting to fix, or the
            log.error("loading the model failed: %s", e)  # engine process already logged its traceback
        else:
            log.exception("loading the model failed")
        state.load_error = first_line(e)
        if on_fatal:
            on_fatal()
        return
    log.debug("API process: %d start-up objects frozen out of garbage collection", freeze_startup_heap())
    state.runtime = rt = runtime  # ready from here on
    log.log(logging.DEBUG if state.core is not None else logging.INFO,  # with several API processes: said once
            "model %r ready in %.1fs: context %d tokens, KV capacity %d tokens%s", rt.name,
            time.perf_counter() - t0, rt.max_model_len, rt.engine.info.kv_capacity_tokens,
            " (DEMO model: not TeleChat)" if rt.is_demo else "")


# ---------------------------------------------------------------------------------------------- middleware

class RequestContext:
    """``X-Request-ID`` echoed (or made up), one log line per request, requests counted by status."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        status, t0 = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            user = scope.get("state", {}).get("user")  # the request's OpenAI ``user``, set by the route
            log.info("%s %s %d %.1fms id=%s%s", scope["method"], scope["path"], status,
                     (time.perf_counter() - t0) * 1000, rid, f" user={user[:64]!r}" if user else "")
            self.state.metrics.requests.labels(status=str(status)).inc()


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before anything parses them (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:  # the buffered body once, then the real channel (disconnects)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(413, f"the request body exceeds the {self.limit}-byte limit", code="request_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)


# ---------------------------------------------------------------------------------------------- errors

def _is_legacy(request: Request) -> bool:
    return request.url.path.startswith(LEGACY_PREFIX)


MAX_DESCRIBED = 5
"""Validation errors named in one message; a fuzzed body can have hundreds."""


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")


def _where(e: dict) -> str:
    """The error's field path (``messages.0.content``), without the union branch names pydantic
    puts in locations (``str``, ``list[...]``, ``function-after[...]``, model names)."""
    parts = [str(x) for x in e["loc"] if x != "body" and (isinstance(x, int) or
             (_FIELD.fullmatch(str(x)) and x not in ("str", "int", "float", "bool", "list", "dict")))]
    return ".".join(parts) or "body"


def _describe(errors: list[dict]) -> str:
    """Validation errors as one sentence per error: ``field: what is wrong``; an invalid-Unicode
    error is named alone (it is the cause of the union's other complaints)."""
    unicode = [e for e in errors if e["type"] == "string_unicode"]
    if unicode:
        return "; ".join(f"{_where(e)}: the text holds a lone surrogate; send valid Unicode (UTF-16 surrogates only "
                         "come in pairs)" for e in unicode[:MAX_DESCRIBED])
    parts, seen = [], set()
    for e in errors:
        loc, ctx = _where(e), e.get("ctx") or {}
        if loc in seen:  # one complaint per field (a union reports one per branch)
            continue
        seen.add(loc)
        if len(parts) == MAX_DESCRIBED:
            parts.append("and more")
            break
        if e["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON ({ctx.get('error', e['msg'])})")
        elif loc == "body" and e["type"] in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("the body must be a JSON object (and sent with Content-Type: application/json)")
        elif e["type"] == "unsupported":
            parts.append(e["msg"])
        elif e["type"] == "value_error":  # our own validators: the sentence is complete
            message = str(ctx.get("error", e["msg"]))
            parts.append(message if loc == "body" else f"{loc}: {message}")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _param(e: dict) -> str | None:
    """The request field an error is about (OpenAI's ``param``)."""
    if e["type"] == "unsupported":
        return (e.get("ctx") or {}).get("field")
    loc = _where(e)
    return None if loc == "body" else loc


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if _is_legacy(request):
        first = errors[0] if errors else {"loc": ("body",), "type": "missing"}
        return _legacy_response(LegacyError(code_for(tuple(first["loc"]), first["type"]), _describe(errors)))
    return _api_response(APIError(400, _describe(errors), param=_param(errors[0]) if errors else None))


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    if _is_legacy(request) and exc.status not in (401, 413):
        return _legacy_response(LegacyError(FAILED, exc.message, exc.status, exc.headers))
    return _api_response(exc)


async def _legacy_error(request: Request, exc: LegacyError) -> JSONResponse:
    return _legacy_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Unknown route (404), wrong method (405): OpenAI body, same status. A body FastAPI could not
    # parse (400) on a legacy route: the official body.
    detail = str(exc.detail)
    if exc.status_code == 400 and detail == "There was an error parsing the body":
        detail = ("the body could not be read as JSON: it must be UTF-8 text, nested at most a few hundred "
                  "levels deep, with integers of at most 4300 digits")
    if exc.status_code == 400 and _is_legacy(request):
        return _legacy_response(LegacyError(MISSING, detail))
    return _api_response(APIError(exc.status_code, detail, code=None, headers=exc.headers))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug. Starlette re-raises after this answer and the server then drops the connection: say
    # so, or the client's next request on this keep-alive connection would fail instead.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _api_response(APIError(500, f"internal error ({type(exc).__name__}); see the server log",
                                  type="server_error", headers={"Connection": "close"}))


def _api_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _legacy_response(e: LegacyError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------------------------- app

def create_app(settings: Settings | None = None, on_fatal: Callable[[], None] | None = None,
               core: CoreAddress | None = None, admitted: Any = None) -> FastAPI:
    """The ASGI app. The model loads in a background thread at startup (``/health`` answers
    meanwhile, ``/ready`` turns 200 when done); ``on_fatal`` is called if loading fails. ``core``: the
    app is one of several API processes over the engine core there (services/api/processes.py), which
    count their requests in flight together in ``admitted``."""
    state = ServerState(settings or get_settings(), core, admitted)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.attach(asyncio.get_running_loop())
        threading.Thread(target=_load_in_background, args=(state, on_fatal), name="model-loader", daemon=True).start()
        yield
        state.grammars.close()
        if state.runtime is not None:
            # Requests had the grace period (see ServerState.begin_shutdown); stop the engine.
            await asyncio.to_thread(state.runtime.engine.shutdown, 0)
        thaw_startup_heap()

    app = FastAPI(title="TeleChat Stack API", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # served by routers/docs.py with local assets
                  description="OpenAI-compatible and legacy TeleChat routes over a continuous-batching engine. "
                  "Send `Authorization: Bearer <API_KEY>` when the server has an API key.")
    app.state.server = state
    for router in (openai.router, tokenize.router, lora.router, legacy.router, health.router, docs.router):
        app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(LegacyError, _legacy_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    # Added innermost first: RequestContext sees every response, CORS headers go on errors too.
    app.add_middleware(BodyLimit)
    origins = state.settings.cors_origin_list
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials="*" not in origins, expose_headers=["X-Request-ID"])
    app.add_middleware(RequestContext, state=state)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """The schema FastAPI generates, minus its 422 answers (this server answers validation errors
    with 400, documented on every route with a body), and with the bearer token required only when
    the server has an API key."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        keyless = not app.state.server.settings.api_key
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                if keyless:
                    operation.pop("security", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


# ---------------------------------------------------------------------------------------------- CLI

DESCRIPTION = ("Serve a TeleChat model over HTTP (OpenAI-compatible /v1 routes and the legacy /telechat/gptDialog "
               "routes). Each flag has an environment variable; flag > environment > default.")


def parse_settings(argv: list[str]) -> Settings:
    """Settings from flags over environment over defaults (flags derived from ``Settings``);
    ``SettingsError`` (one line naming flag and env variable) on a bad value."""
    return settings_cli.parse(Settings, argv, prog="telechat serve", description=DESCRIPTION)


UVICORN_EXTRA_GRACE_S = 5
"""Seconds uvicorn waits past ``shutdown_grace_s`` before it cancels what is left."""


class Server(uvicorn.Server):
    """uvicorn's server that starts the API's own graceful shutdown on the first SIGTERM/SIGINT (only
    SIGTERM for one of several API processes: their supervisor sends it; Ctrl+C reaches it too)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame) -> None:
        """Stop admitting, start the grace timer, then let uvicorn stop accepting connections."""
        if self.state.core is not None and sig == signal.SIGINT:
            return
        self.state.begin_shutdown()
        super().handle_exit(sig, frame)


def uvicorn_config(app: FastAPI, settings: Settings, **where) -> uvicorn.Config:
    """uvicorn's settings for ``app`` (``where``: host and port, or nothing when given sockets)."""
    # uvicorn's own grace only backs ours up: by then every request has ended on its own.
    return uvicorn.Config(app, log_level=settings.log_level, access_log=False,
                          timeout_graceful_shutdown=settings.shutdown_grace_s + UVICORN_EXTRA_GRACE_S, **where)


def prepare_signals() -> None:
    """Stream ends and exit codes as this API wants them, before uvicorn runs."""
    from sse_starlette.sse import AppStatus

    # sse-starlette would cut SSE streams at once; they end through ServerState.begin_shutdown.
    AppStatus.disable_automatic_graceful_drain()
    # After a graceful shutdown uvicorn re-raises the signal with the previous handler; a no-op one
    # makes that a clean exit (0) instead of death by SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)


def api_server_count(settings: Settings) -> int:
    """``API_SERVER_COUNT``, or when unset: with the engine on CUDA one API process per 4 CPU cores this
    process may use, at most 4 (at 64 concurrent streams on an H200 four cut the TTFT tail by 12 %,
    bench/RESULTS.md); on CPU 1 (the engine needs the cores)."""
    if settings.api_server_count is not None:
        return settings.api_server_count
    device = settings.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus // 4))


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a clean shutdown, 1 if the model failed to load."""
    settings = parse_settings(list(argv or []))
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.model_path:  # fail fast, before binding the port, on a folder that cannot work
        from telechat.model.checkpoint import inspect_checkpoint

        inspect_checkpoint(Path(settings.model_path), need_tokenizer=True)
    if settings.lora_path or settings.lora_modules:
        from telechat.runtime import check_adapter

        for folder in ([settings.lora_path] if settings.lora_path else []) + list(settings.lora_module_map.values()):
            check_adapter(folder)
    settings = settings.model_copy(update={"api_server_count": api_server_count(settings)})
    if settings.api_server_count > 1:
        from services.api.processes import serve_many

        return serve_many(settings)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=stop)
    server = Server(uvicorn_config(app, settings, host=settings.api_host, port=settings.api_port), app.state.server)
    prepare_signals()
    server.run()
    return 1 if app.state.server.load_error else 0
