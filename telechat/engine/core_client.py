"""The API process's side of the engine core process (docs/engine.md, "Processes").

:class:`EngineClient` either starts :func:`~telechat.engine.core_process.run_engine_core` in a fresh
interpreter (multiprocessing ``spawn``: CUDA-safe) and owns it, or connects to a core another process
started (:meth:`EngineClient.connect`: the API processes of ``API_SERVER_COUNT`` > 1). It sends add /
abort / shutdown messages and reads its output batches; it offers
:class:`~telechat.engine.async_engine.AsyncEngine`'s interface, so the API does not care which it has.

One thread per client (``telechat-engine-client``) starts the process (when it owns it), reads its
outputs and fans them out to the request streams, and watches the process (its sentinel, or a pidfd
of a core it connected to): when the core dies, every open stream ends with finish reason ``error``
and :attr:`EngineClient.stopped_reason`, and ``alive`` turns false. The owner's thread lives exactly
as long as the process, because Linux's parent-death signal, which the core asks for, follows the
*thread* that started it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

from telechat.engine.async_engine import EngineFront
from telechat.engine.core_messages import (
    AbortAll,
    ClientMessage,
    CoreMessage,
    Hello,
    OutputBatch,
    Ready,
    Shutdown,
    StartFailed,
)
from telechat.engine.core_process import CoreAddress, EngineSpec, run_engine_core
from telechat.errors import UserError

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long the core may take to stop after a shutdown's grace period before it is killed."""
LAST_OUTPUT_WAIT_MS = 200
"""After the process is gone, how long to wait for outputs it sent just before (still in the socket)."""
POLL_MS = 200
"""How often the client thread of a connected client looks at whether it is being closed."""
DETACH_WAIT_S = 2.0
"""How long a connected client that detaches waits for the core to end its aborted requests' streams."""
MAX_SOCKET_PATH = 100
"""Longest ipc:// socket path (the kernel's limit for a Unix socket is 107 bytes)."""


class EngineStartError(RuntimeError):
    """The engine core could not start for a reason other than the user's input (its log has the details)."""


def describe_exit(code: int | None) -> str:
    """``exit code 1`` / ``exit code -9, SIGKILL`` (multiprocessing reports death by signal N as -N)."""
    if code is not None and code < 0:
        try:
            return f"exit code {code}, {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def _socket_dir() -> Path:
    """A private (0700) folder for the two sockets, short enough for Unix socket paths."""
    folder = Path(tempfile.mkdtemp(prefix="telechat-engine-"))
    if len(str(folder / "outputs")) > MAX_SOCKET_PATH:  # a long TMPDIR
        folder.rmdir()
        folder = Path(tempfile.mkdtemp(prefix="telechat-engine-", dir="/tmp"))
    return folder


class EngineClient(EngineFront):
    """The engine in a process of its own, behind the asyncio engine interface.

    ``EngineClient(spec)`` starts the core and returns at once (the caller can load the tokenizer
    meanwhile); ``EngineClient.connect(address)`` joins a running core. :meth:`wait_ready` blocks until
    the model is loaded, or raises why it could not be.
    """

    def __init__(self, spec: EngineSpec | None = None, *, address: CoreAddress | None = None):
        super().__init__()
        self._owner = address is None
        if self._owner:
            self._dir = _socket_dir()
            address = CoreAddress(f"ipc://{self._dir / 'input'}", f"ipc://{self._dir / 'outputs'}", 0)
        self.address = address
        """The core's sockets (and, once started, its pid): what :meth:`connect` needs."""
        self._identity = f"{os.getpid()}-{id(self):x}".encode()
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # never drop a message; they are small and few
        self._input.connect(address.input)
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(CoreMessage)
        self._lock = threading.Lock()  # the input socket is used from the event loop and from shutdown()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._spawned, self._ready, self._exited = threading.Event(), threading.Event(), threading.Event()
        self._start_error: StartFailed | None = None
        self._exit_code: int | None = None
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(spec,), name="telechat-engine-client", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, address: CoreAddress) -> EngineClient:
        """A client of the core at ``address``, which another process started (and stops)."""
        return cls(address=address)

    # ------------------------------------------------------------------ lifecycle

    def started_address(self) -> CoreAddress:
        """The core's address with its pid, once the process is started (what :meth:`connect` takes)."""
        self._spawned.wait()
        return self.address

    @property
    def pid(self) -> int | None:
        """The core process's pid (None until it is started)."""
        if self._owner:
            return self._proc.pid if self._proc is not None else None
        return self.address.pid

    def wait_ready(self) -> None:
        """Block until the core has loaded the model. If it cannot, stop everything and raise
        :class:`~telechat.errors.UserError` (a checkpoint or setting to fix; one line) or
        :class:`EngineStartError`."""
        self._ready.wait()
        if self.info is not None:
            return
        self.shutdown(0)
        if self._start_error is not None:
            kind = UserError if self._start_error.user_error else EngineStartError
            raise kind(self._start_error.error)
        if not self._owner:
            raise EngineStartError(f"the engine process (pid {self.address.pid}) stopped before it was ready")
        raise EngineStartError(f"the engine process stopped while loading the model ({describe_exit(self._exit_code)}); "
                               "see the log above")

    @property
    def alive(self) -> bool:
        """True while the core process serves requests."""
        return self.info is not None and not self._exited.is_set() and not self._stopping

    @property
    def stopped_reason(self) -> str | None:
        """Why the engine no longer serves (one line for the user); None while it is alive."""
        if self.alive:
            return None
        if self._stopping:
            return "the engine was shut down"
        if not self._owner:
            return f"the engine process (pid {self.address.pid}) stopped; restart the server"
        return f"the engine process stopped ({describe_exit(self._exit_code)}); restart the server"

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Let running requests finish for up to ``grace_s`` seconds, abort the rest; the owner then
        stops the core process (killed if it does not stop by itself: it ignores SIGTERM), a connected
        client only detaches (its own requests end; the core serves on)."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._stopping = True
        self._spawned.wait()
        if self._owner:
            self._send(Shutdown(grace_s))
            if not self._exited.wait(grace_s + STOP_TIMEOUT_S) and self._proc is not None:
                log.warning("the engine core did not stop; killing it")  # it ignores SIGTERM (see core_process)
                self._proc.kill()
        else:
            self._wait_for_streams(grace_s)
            self._send(AbortAll("the server is shutting down"))
            self._wait_for_streams(DETACH_WAIT_S)
            self._exited.set()  # the client thread ends at its next look
        self._thread.join()
        with self._lock:
            self._input.close(linger=0 if self._owner else 1000)
        self._ctx.term()
        if self._owner:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _wait_for_streams(self, seconds: float) -> None:
        """Wait up to ``seconds`` for every open stream of this client to end (or the core to go)."""
        deadline = time.monotonic() + seconds
        while self._streams and time.monotonic() < deadline and not self._exited.is_set():
            time.sleep(0.02)

    def _send(self, msg: ClientMessage) -> None:
        data = self._encoder.encode(msg)
        with self._lock:
            if self._input.closed:
                return
            try:
                self._input.send_multipart([self._identity, data], zmq.NOBLOCK)
            except zmq.Again:  # no core connected (it is gone): nothing is listening any more
                pass

    # ------------------------------------------------------------------ the client thread

    def _run(self, spec: EngineSpec | None) -> None:
        """Start the process (when this client owns it), say Hello, then deliver its messages until it is gone."""
        output = self._ctx.socket(zmq.DEALER)
        output.setsockopt(zmq.IDENTITY, self._identity)
        output.setsockopt(zmq.RCVHWM, 0)
        output.connect(self.address.output)
        watch = None
        try:
            if self._owner:
                ctx = multiprocessing.get_context("spawn")
                self._proc = ctx.Process(target=run_engine_core, name="telechat-engine-core", daemon=True,
                                         args=(spec, self.address, os.getpid()))
                self._proc.start()
                self.address = CoreAddress(self.address.input, self.address.output, self._proc.pid)
                log.info("engine core process started (pid %d)", self._proc.pid)
                watch = self._proc.sentinel
            else:
                watch = os.pidfd_open(self.address.pid)
        except Exception as e:  # noqa: BLE001 - reported by wait_ready
            what = "starting the engine process" if self._owner else f"connecting to the engine (pid {self.address.pid})"
            self._start_error = StartFailed(f"{what} failed: {e}", False)
            output.close(linger=0)
            self._proc = None
            self._exited.set()
            self._ready.set()
            return
        finally:
            self._spawned.set()
        try:
            output.send(self._encoder.encode(Hello()))
            poller = zmq.Poller()
            poller.register(output, zmq.POLLIN)
            poller.register(watch, zmq.POLLIN)
            while True:
                events = dict(poller.poll(None if self._owner else POLL_MS))
                if output in events:
                    self._receive(output)
                if watch in events or (not self._owner and self._exited.is_set()):
                    break
            while self._owner and output.poll(LAST_OUTPUT_WAIT_MS):
                self._receive(output)
        except BaseException:
            log.exception("the engine client thread failed; stopping the engine core")
            if self._proc is not None:
                self._proc.kill()
        finally:
            if self._proc is not None:
                self._proc.join()
                self._exit_code = self._proc.exitcode
            elif not self._owner:
                os.close(watch)
            output.close(linger=0)
            self._exited.set()
            self._ready.set()
            if self.info is not None and not self._stopping:
                log.error("the engine core process stopped (%s)", describe_exit(self._exit_code)
                          if self._owner else f"pid {self.address.pid}")
            self._end_streams(self.stopped_reason or "the engine stopped")

    def _receive(self, output: zmq.Socket) -> None:
        """Handle every message waiting in the output socket."""
        while True:
            try:
                msg = self._decoder.decode(output.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if isinstance(msg, OutputBatch):
                self._deliver(msg)
            elif isinstance(msg, Ready):
                self._stats = msg.stats
                self.info = msg.info
                self._ready.set()
            else:
                self._start_error = msg
