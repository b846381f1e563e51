"""The messages between the API process and the engine core (docs/engine.md, "Processes"), and
nothing else.

They travel as msgpack (msgspec) over ZeroMQ between :class:`~telechat.engine.core_client.EngineClient`
and :func:`~telechat.engine.core_process.run_engine_core`; the in-process
:class:`~telechat.engine.async_engine.AsyncEngine` passes the same objects through a queue.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from telechat.engine.request import RequestOutput
from telechat.engine.sampling import SamplingParams

# ---------------------------------------------------------------------------------------------- client -> core


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    """Queue a request (the core answers a request that can never fit with ``OutputBatch.rejected``)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    after: str | None = None
    """Another choice of the same prompt to admit this one after (see ``Request.after``)."""
    lora: str | None = None
    """The loaded LoRA adapter to run it with (None: the base model)."""


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    """End requests at the next step boundary (finish reason ``abort``); ``error`` None: the client gave up."""

    request_ids: list[str]
    error: str | None = None


class AbortAll(msgspec.Struct, tag="abort_all", array_like=True):
    """End every request of the sending client with finish reason ``abort`` and ``error`` (server shutdown)."""

    error: str
    prefix: str = ""
    """Only requests whose id starts with this (the core sets it to the client's namespace; "": all)."""


class LoadLoraAdapter(msgspec.Struct, tag="load_lora", array_like=True):
    """Read the LoRA adapter folder ``path`` for requests naming ``name`` (answered in ``OutputBatch.replies``)."""

    call_id: str
    name: str
    path: str


class UnloadLoraAdapter(msgspec.Struct, tag="unload_lora", array_like=True):
    """Forget the LoRA adapter ``name`` (answered in ``OutputBatch.replies``)."""

    call_id: str
    name: str


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """A client connected: the core answers with ``Ready`` once the engine is built (or ``StartFailed``)."""


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """Let running requests finish for up to ``grace_s`` seconds, abort the rest, then stop."""

    grace_s: float


ClientMessage = Union[AddRequest, AbortRequests, AbortAll, LoadLoraAdapter, UnloadLoraAdapter, Hello, Shutdown]

# ---------------------------------------------------------------------------------------------- core -> client


class EngineInfo(msgspec.Struct, array_like=True):
    """What the API process needs to know about the engine it does not hold (no model object there)."""

    max_model_len: int
    """Longest prompt + reply, after the KV capacity capped it."""
    kv_capacity_tokens: int
    vocab_size: int
    """Token ids a prompt may hold: ``[0, vocab_size)``."""
    max_loras: int = 0
    """LoRA adapter slots (0: requests cannot name adapters and none can be loaded)."""
    lora_adapters: dict[str, str] = {}
    """The LoRA adapters loaded at start: name -> folder."""


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The model is loaded and the engine built; the core now serves requests."""

    info: EngineInfo
    stats: dict[str, Any]


class StartFailed(msgspec.Struct, tag="failed", array_like=True):
    """Loading the model or building the engine failed; the core exits after sending this."""

    error: str
    """One line for the user."""
    user_error: bool
    """True for something the user must fix (a :class:`~telechat.errors.UserError`, e.g. a bad checkpoint)."""


class ControlReply(msgspec.Struct, array_like=True):
    """The outcome of a LoRA load or unload message."""

    error: str | None = None
    """None: done; else why not (one line for the user)."""
    not_found: bool = False
    """The message named an adapter the engine does not have."""


class OutputBatch(msgspec.Struct, tag="outputs", array_like=True):
    """What one engine step (or one round of client messages) produced, and the engine's figures after it."""

    outputs: list[RequestOutput]
    rejected: dict[str, str]
    """Requests refused at ``add`` (request id -> why); they never started."""
    stats: dict[str, Any]
    replies: dict[str, ControlReply] = {}
    """Answers to the LoRA load / unload messages handled since the last batch, by ``call_id``."""
    lora_adapters: dict[str, str] | None = None
    """After a LoRA adapter was loaded or unloaded (by any client): every adapter now loaded, name -> folder."""


CoreMessage = Union[Ready, StartFailed, OutputBatch]
