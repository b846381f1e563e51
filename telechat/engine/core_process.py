"""The engine core in a process of its own (docs/engine.md, "Processes"), in the shape of vLLM V1's
EngineCore process: it loads the checkpoint itself from a small :class:`EngineSpec`, then runs a
busy loop that applies the client's messages (add / abort / abort all / shutdown) and sends one
:class:`~telechat.engine.core_messages.OutputBatch` per engine step.

Transport: ZeroMQ over ``ipc://`` sockets in a private (0700) temporary folder that the client
creates and binds; the core connects a PULL socket for messages and a PUSH socket for outputs,
msgpack-encoded by msgspec. :class:`CoreLoop` is the part that knows the engine; the in-process
:class:`~telechat.engine.async_engine.AsyncEngine` runs the same loop in a thread.

The core never outlives the API process: it asks Linux to kill it when its parent dies
(``PR_SET_PDEATHSIG``) and checks its parent's pid in the loop. It ignores SIGINT (Ctrl+C reaches
the whole process group; the API drains its streams and then stops the core).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import zmq

from telechat.engine.core_messages import (
    AbortAll,
    AbortRequests,
    AddRequest,
    ClientMessage,
    ControlReply,
    EngineInfo,
    LoadLoraAdapter,
    OutputBatch,
    Ready,
    Shutdown,
    StartFailed,
    UnloadLoraAdapter,
)
from telechat.engine.request import RequestOutput

if TYPE_CHECKING:
    from telechat.engine.core import EngineConfig

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5
"""How long an idle core waits for a message before it looks at its parent again."""
MAX_FAILED_STEPS = 2
"""Consecutive failed engine steps after which the engine counts as broken and the core stops."""
SHUTDOWN_ERROR = "the engine is shutting down"
"""The error of requests still running when a shutdown's grace period is over."""
STEP_ERROR = "internal engine error"
"""The error of requests that were in a step that raised."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The log line format of ``telechat`` commands (telechat/cli.py), also used by the core process."""


@dataclass
class EngineSpec:
    """What the core needs to build its engine: small and picklable (a model is never pickled)."""

    path: str
    device: str = "auto"
    dtype: str = "auto"
    engine_config: EngineConfig | None = None
    lora: str | None = None
    """A LoRA adapter folder merged into the weights after loading."""
    lora_modules: dict[str, str] = field(default_factory=dict)
    """LoRA adapters requests may choose by name (name -> folder); needs ``engine_config.max_loras``."""
    config_overrides: dict = field(default_factory=dict)
    """Config values replaced for this load (``rope_mode``, ``training_seqlen``, ...)."""
    log_level: str = "INFO"


def build_engine(spec: EngineSpec):
    """Load the checkpoint of ``spec`` (and its LoRA adapter) and build the engine over it."""
    from telechat.engine.core import LLMEngine
    from telechat.engine.guided import GrammarCompiler
    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.model.loader import load_model
    from telechat.runtime import merge_adapter

    info = inspect_checkpoint(spec.path)
    model = load_model(info, device=spec.device, dtype=spec.dtype, **spec.config_overrides)
    if spec.lora:
        model = merge_adapter(model, spec.lora)
    grammars = GrammarCompiler.from_path(spec.path, model.config.vocab_size)  # built on first use
    engine = LLMEngine(model, spec.engine_config, grammars=grammars)
    for name, folder in spec.lora_modules.items():
        engine.load_adapter(name, folder)
    return engine


def engine_info(engine) -> EngineInfo:
    """The figures the API process needs about ``engine`` (it holds no model)."""
    stats = engine.stats()
    return EngineInfo(max_model_len=stats["max_model_len"], kv_capacity_tokens=stats["kv_capacity_tokens"],
                      vocab_size=engine.model.config.vocab_size, max_loras=engine.config.max_loras,
                      lora_adapters={name: a.path for name, a in engine.adapters.items()})


class CoreLoop:
    """Applies client messages to an engine and steps it; the same for the core process and the
    in-process thread. Single-threaded: only the thread that runs :meth:`run` touches the engine."""

    def __init__(self, engine):
        self.engine = engine
        self._rejected: dict[str, str] = {}
        self._replies: dict[str, ControlReply] = {}
        self._deadline: float | None = None
        self._failed_steps = 0

    def handle(self, msg: ClientMessage) -> None:
        """Apply one client message."""
        if isinstance(msg, AddRequest):
            try:
                self.engine.add_request(msg.prompt_ids, msg.params, msg.request_id, after=msg.after, lora=msg.lora)
            except ValueError as e:
                self._rejected[msg.request_id] = str(e)
        elif isinstance(msg, AbortRequests):
            for rid in msg.request_ids:
                self.engine.abort(rid, msg.error)
        elif isinstance(msg, AbortAll):
            self._abort_all(msg.error)
        elif isinstance(msg, (LoadLoraAdapter, UnloadLoraAdapter)):
            self._replies[msg.call_id] = self._adapter_change(msg)
        elif isinstance(msg, Shutdown):
            self._deadline = time.monotonic() + msg.grace_s

    def _adapter_change(self, msg: LoadLoraAdapter | UnloadLoraAdapter) -> ControlReply:
        """Load or unload a LoRA adapter; what went wrong as a reply, never an exception."""
        try:
            if isinstance(msg, LoadLoraAdapter):
                self.engine.load_adapter(msg.name, msg.path)
            else:
                self.engine.unload_adapter(msg.name)
        except KeyError as e:
            return ControlReply(e.args[0], not_found=True)
        except ValueError as e:
            return ControlReply(str(e))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory reading a huge folder: this call fails alone
            log.exception("changing LoRA adapter %r failed", msg.name)
            return ControlReply(f"internal error ({type(e).__name__}: {e})")
        return ControlReply()

    def _abort_all(self, error: str) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid, error)

    def step(self) -> OutputBatch:
        """One engine step (when there is work), with the requests refused since the last batch and
        the engine's figures after it."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._abort_all(SHUTDOWN_ERROR)
        outputs: list[RequestOutput] = []
        if self.engine.has_unfinished():
            try:
                outputs = self.engine.step()
                self._failed_steps = 0
            except Exception:
                self._failed_steps += 1
                if self._failed_steps >= MAX_FAILED_STEPS:
                    raise  # the engine is broken: stop, so the client reports it and the server can be restarted
                log.exception("engine step failed; ending the requests in flight")
                outputs = [RequestOutput(rid, [], finished=True, finish_reason="error", error=STEP_ERROR)
                           for rid in list(self.engine.requests)]
                self._abort_all(STEP_ERROR)
        batch = OutputBatch(outputs, self._rejected, self.engine.stats(), self._replies)
        self._rejected, self._replies = {}, {}
        return batch

    def run(self, receive: Callable[[float], list[ClientMessage]], send: Callable[[OutputBatch], None],
            keep_going: Callable[[], bool] = lambda: True) -> None:
        """Serve until a :class:`Shutdown` has run its course or ``keep_going`` turns false.

        ``receive(timeout_s)`` returns the messages that arrived, waiting up to ``timeout_s`` for the
        first (0 while the engine has work: it never waits then); ``send`` takes one batch per step.
        """
        while True:
            messages = receive(0.0 if self.engine.has_unfinished() else IDLE_WAIT_S)
            for msg in messages:
                self.handle(msg)
            if not keep_going():
                return
            if messages or self.engine.has_unfinished():
                send(self.step())
            if self._deadline is not None and not self.engine.has_unfinished():
                return


# ---------------------------------------------------------------------------------------------- the process

def _follow_parent(parent_pid: int) -> None:
    """Die with the parent: the kernel sends SIGKILL when it goes (Linux); if it is already gone, exit now."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def run_engine_core(spec: EngineSpec, input_address: str, output_address: str, parent_pid: int) -> None:
    """The core process: build the engine, say ``Ready`` (or ``StartFailed`` and exit 1), then serve
    until the client's ``Shutdown`` or the parent's death."""
    _follow_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A spawned child inherits the "spawn" start method, under which the multiprocessing locks that
    # libraries make (tqdm's, for the loading bar) are named semaphores the resource tracker reports
    # as leaked at exit. The core starts no processes itself: "fork" makes such locks anonymous.
    multiprocessing.set_start_method("fork", force=True)
    logging.basicConfig(level=spec.log_level, format=LOG_FORMAT, datefmt="%H:%M:%S")
    code = _serve(spec, input_address, output_address, parent_pid)
    # Sockets are closed and logs flushed: skip the interpreter's teardown, seconds with torch loaded.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(spec: EngineSpec, input_address: str, output_address: str, parent_pid: int) -> int:
    """Connect, build the engine and run the loop; the exit code (1: the engine could not be built)."""
    from telechat.errors import UserError
    from telechat.model.checkpoint import first_line

    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(input_address)
    outbox.connect(output_address)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs; the client reads them as they come
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ClientMessage)
    try:
        try:
            engine = build_engine(spec)
        except Exception as e:  # noqa: BLE001 - reported to the client, which tells the user
            user = isinstance(e, UserError)
            if not user:
                log.exception("the engine core failed to start")
            error = first_line(e) if user else f"{type(e).__name__}: {first_line(e)}"
            outbox.send(encoder.encode(StartFailed(error, user)))
            return 1
        outbox.send(encoder.encode(Ready(engine_info(engine), engine.stats())))

        def receive(timeout_s: float) -> list[ClientMessage]:
            if timeout_s and not inbox.poll(int(timeout_s * 1000)):
                return []
            messages = []
            while True:
                try:
                    messages.append(decoder.decode(inbox.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    return messages

        CoreLoop(engine).run(receive, lambda batch: outbox.send(encoder.encode(batch)),
                             keep_going=lambda: os.getppid() == parent_pid)
        log.info("engine core stopped")
        return 0
    finally:
        inbox.close(linger=0)
        outbox.close(linger=5000)  # deliver the last outputs
        ctx.term()
