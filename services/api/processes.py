"""Several API processes over one engine core (``API_SERVER_COUNT`` > 1; docs/engine.md, "Processes").

One event loop parses, tokenizes, detokenizes and frames every stream of a server; at thousands of
streamed tokens per second it can become the limit. As vLLM's ``--api-server-count`` does, this
process then supervises: it binds the listening socket, starts the engine core (and owns it), and
starts that many API processes (multiprocessing ``spawn``), each a uvicorn server on the shared socket
whose runtime joins the core (:meth:`~telechat.engine.core_client.EngineClient.connect`); the kernel
spreads connections over them, unevenly at times. They count their requests in flight together (a shared
counter), so the server admits ``MAX_NUM_SEQS + MAX_QUEUE`` whichever process a connection lands on;
``/metrics`` in any of them sums the request figures of all (prometheus_client's multiprocess files).

Lifecycle: SIGTERM or SIGINT here sends SIGTERM to every API process (each drains its streams for
``SHUTDOWN_GRACE_S``, as a single server does) and then stops the core; an API process that dies
stops the whole server (exit 1: the process manager restarts it); a model that cannot load is said
once and exits 1; a core that dies leaves the API processes answering 503, as a single server does.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any

from services.api.main import Server, UVICORN_EXTRA_GRACE_S, create_app, engine_options, prepare_signals, uvicorn_config
from services.api.settings import Settings
from telechat.engine.core_client import EngineClient, describe_exit
from telechat.engine.core_process import LOG_FORMAT, CoreAddress, follow_parent
from telechat.errors import UserError
from telechat.model.checkpoint import first_line
from telechat.runtime import engine_spec

log = logging.getLogger("services.api")

STOP_EXTRA_S = 5.0
"""Seconds past the API processes' own shutdown limit before they are killed."""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket the API processes share; a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port / API_PORT") from None
    sock.listen(2048)
    return sock


def run_api_process(settings: Settings, sock: socket.socket, core: CoreAddress, admitted: Any,
                    parent_pid: int) -> None:
    """One API process: the app over the core at ``core``, served on ``sock`` until SIGTERM; ``admitted``
    counts the requests in flight in every API process (one capacity for the server)."""
    follow_parent(parent_pid)
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, datefmt="%H:%M:%S")
    logging.getLogger("telechat.runtime").setLevel(logging.WARNING)  # which model is served: said once, above
    server: Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=stop, core=core, admitted=admitted)
    server = Server(uvicorn_config(app, settings), app.state.server)
    prepare_signals()
    server.run(sockets=[sock])
    raise SystemExit(1 if app.state.server.load_error else 0)


def _stop(workers: list[multiprocessing.process.BaseProcess], limit_s: float) -> None:
    """SIGTERM every live API process, wait up to ``limit_s`` for all, kill what is left."""
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGTERM)
    pending = [w for w in workers if w.is_alive()]
    deadline = time.monotonic() + limit_s
    while pending and time.monotonic() < deadline:
        multiprocessing.connection.wait([w.sentinel for w in pending], timeout=deadline - time.monotonic())
        pending = [w for w in pending if w.is_alive()]
    for w in workers:
        w.join(timeout=0.1)
        if w.is_alive():
            log.warning("API process %s did not stop; killing it", w.name)
            w.kill()
            w.join()


def serve_many(settings: Settings) -> int:
    """Supervise ``settings.api_server_count`` API processes and the engine core until SIGTERM/SIGINT;
    0 after a clean shutdown, 1 if the model failed to load or an API process died."""
    count = settings.api_server_count
    sock = bind(settings.api_host, settings.api_port)
    metrics_dir = tempfile.mkdtemp(prefix="telechat-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before the API processes import prometheus_client
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    info, options = engine_options(settings)
    engine = EngineClient(engine_spec(info, **options))
    failed: list[str] = []

    def watch_loading() -> None:
        try:
            engine.wait_ready()
        except Exception as e:  # noqa: BLE001 - said once below
            failed.append(first_line(e))
            stop.set()
        else:
            log.info("engine ready: context %d tokens, KV capacity %d tokens; %d API processes on %s:%d%s",
                     engine.info.max_model_len, engine.info.kv_capacity_tokens, count, settings.api_host,
                     settings.api_port, " (DEMO model: not TeleChat)" if info.is_demo else "")

    ctx = multiprocessing.get_context("spawn")
    core = engine.started_address()
    admitted = ctx.Value("i", 0)
    workers = [ctx.Process(target=run_api_process, args=(settings, sock, core, admitted, os.getpid()),
                           name=f"telechat-api-{i}") for i in range(count)]
    code = 0
    try:
        for w in workers:
            w.start()
        sock.close()  # the API processes hold it
        threading.Thread(target=watch_loading, name="engine-loading", daemon=True).start()
        sentinels = {w.sentinel: w for w in workers}
        while not stop.is_set():
            done = multiprocessing.connection.wait(list(sentinels), timeout=0.2)
            if done and not stop.wait(0.5):  # a model that failed to load stops every API process too
                w = sentinels[done[0]]
                log.error("API process %s stopped (%s); stopping the server", w.name, describe_exit(w.exitcode))
                code = 1
                break
        if failed:
            log.error("loading the model failed: %s", failed[0])
            code = 1
        log.info("stopping %d API processes", count)
        _stop(workers, settings.shutdown_grace_s + UVICORN_EXTRA_GRACE_S + STOP_EXTRA_S)
    finally:
        engine.shutdown(0)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code
