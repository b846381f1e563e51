"""The engine core in a process of its own (docs/engine.md, "Processes"), in the shape of vLLM V1's
EngineCore process: it loads the checkpoint itself from a small :class:`EngineSpec`, then runs a
busy loop that applies its clients' messages (add / abort / abort all / shutdown) and sends each
client one :class:`~telechat.engine.core_messages.OutputBatch` per engine step.

Transport: ZeroMQ over ``ipc://`` sockets in a private (0700) temporary folder that the starting
client creates (:class:`CoreAddress`); the core binds a PULL socket for messages (clients PUSH
``[identity, message]``) and a ROUTER socket for outputs (clients connect a DEALER under the same
identity and say ``Hello`` on it), msgpack-encoded by msgspec. Several API processes can be clients
of one core (``API_SERVER_COUNT``); :class:`ClientRouter` keeps their request ids apart and gives
each its own outputs. :class:`CoreLoop` is the part that knows the engine; the in-process
:class:`~telechat.engine.async_engine.AsyncEngine` runs the same loop in a thread.

The core never outlives the process that started it: it asks Linux to kill it when its parent dies
(``PR_SET_PDEATHSIG``) and checks its parent's pid in the loop. It ignores SIGINT and SIGTERM (Ctrl+C
or a service manager may signal the whole process group; the API drains its streams, then stops the core).
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
    Hello,
    LoadLoraAdapter,
    OutputBatch,
    Ready,
    Shutdown,
    StartFailed,
    UnloadLoraAdapter,
)
from telechat.engine.request import RequestOutput
from telechat.heap import freeze_startup_heap

if TYPE_CHECKING:
    from telechat.engine.core import EngineConfig

log = logging.getLogger(__name__)

HELLO_WAIT_S = 5.0
"""How long a core that failed to start waits for its starting client's ``Hello`` to say why."""
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
            self._abort_all(msg.error, msg.prefix)
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

    def _abort_all(self, error: str, prefix: str = "") -> None:
        for rid in [r for r in self.engine.requests if r.startswith(prefix)]:
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
        self._rejected.update(self.engine.take_refused())
        adapters = {name: a.path for name, a in self.engine.adapters.items()} if self._replies else None
        batch = OutputBatch(outputs, self._rejected, self.engine.stats(), self._replies, adapters)
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

def follow_parent(parent_pid: int) -> None:
    """Die with the parent: the kernel sends SIGKILL when it goes (Linux); if it is already gone, exit now."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class CoreAddress:
    """Where an engine core listens: its two sockets and its pid (picklable: API processes get it)."""

    input: str
    """``ipc://`` address of the core's PULL socket (clients PUSH ``[identity, message]``)."""
    output: str
    """``ipc://`` address of the core's ROUTER socket (clients connect a DEALER with their identity)."""
    pid: int


class ClientRouter:
    """The clients (API processes) of one core: each request id is namespaced by its client
    (``"<n>."`` + the client's id, so two clients may use the same ids), and each step's batch is split
    so every client gets its own outputs, rejections and replies, with the engine's figures."""

    def __init__(self, sock: zmq.Socket, encoder: msgspec.msgpack.Encoder):
        self._sock, self._encoder = sock, encoder
        self._prefixes: dict[bytes, str] = {}

    @property
    def identities(self) -> list[bytes]:
        """Every client that said ``Hello``."""
        return list(self._prefixes)

    def hello(self, identity: bytes) -> None:
        """Remember a client (its namespace is the next number)."""
        self._prefixes.setdefault(identity, f"{len(self._prefixes)}.")

    def inbound(self, identity: bytes, msg: ClientMessage) -> ClientMessage:
        """``msg`` with the request and call ids in the sender's namespace."""
        # Requests come on the PULL socket, Hello on the ROUTER one: a request may be read first.
        self.hello(identity)
        prefix = self._prefixes[identity]
        if isinstance(msg, AddRequest):
            msg.request_id = prefix + msg.request_id
            msg.after = prefix + msg.after if msg.after is not None else None
        elif isinstance(msg, AbortRequests):
            msg.request_ids = [prefix + rid for rid in msg.request_ids]
        elif isinstance(msg, AbortAll):
            msg.prefix = prefix
        elif isinstance(msg, (LoadLoraAdapter, UnloadLoraAdapter)):
            msg.call_id = prefix + msg.call_id
        return msg

    def send(self, identity: bytes, msg) -> None:
        self._sock.send_multipart([identity, self._encoder.encode(msg)])

    def deliver(self, batch: OutputBatch) -> None:
        """Send every client its part of ``batch`` (each gets the figures and any adapter change)."""
        parts = {p: OutputBatch([], {}, batch.stats, {}, batch.lora_adapters) for p in self._prefixes.values()}

        def owner(namespaced: str) -> tuple[OutputBatch | None, str]:
            prefix, _, key = namespaced.partition(".")
            return parts.get(prefix + "."), key

        for out in batch.outputs:
            part, out.request_id = owner(out.request_id)
            if part is not None:
                part.outputs.append(out)
        for rid, why in batch.rejected.items():
            part, rid = owner(rid)
            if part is not None:
                part.rejected[rid] = why
        for cid, reply in batch.replies.items():
            part, cid = owner(cid)
            if part is not None:
                part.replies[cid] = reply
        for identity, prefix in self._prefixes.items():
            self.send(identity, parts[prefix])


def run_engine_core(spec: EngineSpec, address: CoreAddress, parent_pid: int) -> None:
    """The core process: bind its sockets, build the engine, answer each client's ``Hello`` with
    ``Ready`` (or every client with ``StartFailed`` and exit 1), then serve until a ``Shutdown`` or
    the parent's death."""
    follow_parent(parent_pid)
    # Ctrl+C, or a service manager's SIGTERM, may reach the whole process group: the process that
    # started the core drains its streams first and then stops it (or the core dies with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A spawned child inherits the "spawn" start method, under which the multiprocessing locks that
    # libraries make (tqdm's, for the loading bar) are named semaphores the resource tracker reports
    # as leaked at exit. The core starts no processes itself: "fork" makes such locks anonymous.
    multiprocessing.set_start_method("fork", force=True)
    logging.basicConfig(level=spec.log_level, format=LOG_FORMAT, datefmt="%H:%M:%S")
    code = _serve(spec, address, parent_pid)
    # Sockets are closed and logs flushed: skip the interpreter's teardown, seconds with torch loaded.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(spec: EngineSpec, address: CoreAddress, parent_pid: int) -> int:
    """Bind, build the engine and run the loop; the exit code (1: the engine could not be built)."""
    from telechat.errors import UserError
    from telechat.model.checkpoint import first_line

    ctx = zmq.Context()
    inbox, router = ctx.socket(zmq.PULL), ctx.socket(zmq.ROUTER)
    inbox.bind(address.input)
    router.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs; clients read them as they come
    router.bind(address.output)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ClientMessage)
    clients = ClientRouter(router, encoder)
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(router, zmq.POLLIN)
    engine = None  # until built, a Hello is only remembered; once built, answered with Ready

    def receive(timeout_s: float) -> list[ClientMessage]:
        if timeout_s and not poller.poll(int(timeout_s * 1000)):
            return []
        messages = []
        for sock in (router, inbox):  # Hellos first: a client's requests follow its Hello
            while True:
                try:
                    identity, data = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = decoder.decode(data)
                if isinstance(msg, Hello):
                    clients.hello(identity)
                    if engine is not None:
                        clients.send(identity, Ready(engine_info(engine), engine.stats()))
                else:
                    messages.append(clients.inbound(identity, msg))
        return messages

    try:
        try:
            engine = build_engine(spec)
        except Exception as e:  # noqa: BLE001 - reported to the clients, which tell the user
            user = isinstance(e, UserError)
            if not user:
                log.exception("the engine core failed to start")
            error = first_line(e) if user else f"{type(e).__name__}: {first_line(e)}"
            deadline = time.monotonic() + HELLO_WAIT_S  # the starting client's Hello may still be on its way
            while not clients.identities and time.monotonic() < deadline and os.getppid() == parent_pid:
                receive(0.1)
            receive(0.1)
            for identity in clients.identities:
                clients.send(identity, StartFailed(error, user))
            return 1
        log.debug("engine core: %d start-up objects frozen out of garbage collection", freeze_startup_heap())
        CoreLoop(engine).run(receive, clients.deliver, keep_going=lambda: os.getppid() == parent_pid)
        log.info("engine core stopped")
        return 0
    finally:
        inbox.close(linger=0)
        router.close(linger=5000)  # deliver the last outputs
        ctx.term()
