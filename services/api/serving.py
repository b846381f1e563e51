"""What every generating route shares: request checks against the loaded model, prompt encoding off
the event loop, admission into the bounded queue, metrics, abort on client disconnect, and the
OpenAI SSE event stream.

Routers stay thin by calling these; nothing here knows about HTTP routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from services.api.deps import SHUTTING_DOWN, ServerState
from services.api.logprobs import CompletionLogprobsBuilder, TokenTexts, chat_logprobs
from services.api.protocol.openai import (
    APIError,
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from telechat.errors import RequestRefused

if TYPE_CHECKING:
    from services.api.choices import Choices
    from services.api.metrics import Metrics
    from telechat.engine.sampling import SamplingParams
    from telechat.runtime import Runtime, StreamDelta

log = logging.getLogger(__name__)
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------- checks

def check_model(rt: Runtime, requested: str | None) -> str | None:
    """The LoRA adapter ``requested`` names (None: the base model); 404 unless it is empty, the served
    model's id (or one of its aliases, ``--served-model-name``) or a loaded adapter's name."""
    if not requested or requested in rt.names:
        return None
    if requested in rt.engine.lora_adapters:
        return requested
    served = ", ".join(repr(m) for m in [*rt.names, *rt.engine.lora_adapters])
    raise APIError(404, f"the model {requested!r} does not exist; this server serves {served} "
                   "(see GET /v1/models)", code="model_not_found", param="model")


def served_name(rt: Runtime, requested: str | None) -> str:
    """The model id a response carries: the name the request used when it is one of the served
    model's names, else its main name."""
    return requested if requested in rt.names else rt.name


def check_request_fields(rt: Runtime, body, request: Request) -> None:
    """Checks of a generation request against the loaded model: the token ids it names
    (``logit_bias``, ``stop_token_ids``) are in the vocabulary (400 otherwise). Its ``user`` goes to the
    request's log line (not stored)."""
    vocab = rt.vocab_size
    bad = [t for t in body.token_ids_used() if t >= vocab]
    if bad:
        param = "stop_token_ids" if bad[0] in (body.stop_token_ids or []) else "logit_bias"
        raise APIError(400, f"token id {bad[0]} is not in this model's vocabulary [0, {vocab})", param=param)
    if body.user:
        request.state.user = body.user


def resolve_max_tokens(rt: Runtime, prompt_len: int, requested: int | None) -> int:
    """The reply budget: ``requested``, or what the context leaves; 400 when either does not fit."""
    ctx = rt.max_model_len
    if prompt_len >= ctx:
        raise APIError(400, f"the prompt is {prompt_len} tokens long; this model's context is {ctx} tokens "
                       "(prompt + reply): shorten the messages", code="context_length_exceeded", param="messages")
    room = ctx - prompt_len
    if requested is not None and requested > room:
        raise APIError(400, f"max_tokens={requested} is too large: the prompt uses {prompt_len} of the "
                       f"{ctx}-token context, so at most {room} tokens can be generated",
                       code="context_length_exceeded", param="max_tokens")
    return requested or room


def build_params(make: Callable[[], SamplingParams]) -> SamplingParams:
    """Run a ``to_sampling_params`` call, turning the engine's ``ValueError`` into a 400."""
    try:
        return make()
    except ValueError as e:
        raise APIError(400, str(e)) from e


def check_prompt_size(rt: Runtime, texts: list[str], param: str) -> None:
    """400 for text that cannot fit the context, decided from its size alone (no tokenizing):
    characters first, then UTF-8 bytes, against :attr:`Runtime.max_prompt_bytes`."""
    limit = rt.max_prompt_bytes
    chars = sum(map(len, texts))
    size = chars if chars > limit else sum(len(t.encode("utf-8")) for t in texts)
    if size > limit:
        raise APIError(400, f"the prompt is far too long for this model's {rt.max_model_len}-token context "
                       f"({chars} characters, {size} bytes or more; anything over {limit} bytes cannot fit): "
                       "shorten it", code="context_length_exceeded", param=param)


async def encode(fn: Callable[[], list[int]], param: str) -> list[int]:
    """Run a prompt encoder in a worker thread (tokenizing a long prompt must not stall the event
    loop that serves every other stream), turning its ``ValueError`` into a 400."""
    try:
        ids = await asyncio.to_thread(fn)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from e
    if not ids:
        raise APIError(400, f"{param} encodes to no tokens", param=param)
    return ids


# ---------------------------------------------------------------------------------------------- generation


async def start(state: ServerState, rt: Runtime, prompt_ids: list[int], params: SamplingParams,
                request_id: str, *, continuation: bool = False, lora: str | None = None,
                after: str | None = None) -> AsyncIterator[StreamDelta]:
    """Admit a request (429 raised here, before any response starts) and return its delta stream
    (``lora``: generated with that loaded adapter; ``after``: a sibling choice it follows, see
    ``Request.after``).

    The stream is already started, so even a response that never iterates it releases the slot
    when it is closed or garbage-collected.
    """
    agen = _generate(state, rt, prompt_ids, params, request_id, continuation, lora, after)
    await agen.__anext__()  # runs admission
    return agen


class _StreamMetrics:
    """The latency figures of one request's stream as its deltas arrive (TTFT, inter-token latency, the engine's
    queue and prefill times, end to end) and the reason it ended."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.tokens = 0
        self.reason = "abort"  # unless the engine says otherwise (e.g. the client left)

    def observe(self, d: StreamDelta) -> None:
        """Record one delta."""
        now, m = time.perf_counter(), self.m
        if d.completion_tokens > self.tokens:
            if self.tokens == 0:
                m.time_to_first_token.observe(now - self.start)
            else:  # one observation per delta: the mean gap of the tokens it carries
                m.inter_token_latency.observe((now - self.last) / (d.completion_tokens - self.tokens))
            self.tokens, self.last = d.completion_tokens, now
        if d.queue_s is not None:
            m.request_queue_time.observe(d.queue_s)
            m.request_prefill_time.observe(d.prefill_s)
        if d.finish_reason:
            self.reason = d.finish_reason
            m.e2e_request_latency.observe(now - self.start)


async def _generate(state: ServerState, rt: Runtime, prompt_ids: list[int], params: SamplingParams,
                    request_id: str, continuation: bool, lora: str | None,
                    after: str | None = None) -> AsyncIterator[StreamDelta | None]:
    state.admit()
    # Made before the first yield: a stream closed right after its admission (a sibling choice was refused)
    # still counts its end and gives its slot back.
    times = _StreamMetrics(state.metrics)
    try:
        yield None  # admitted
        state.metrics.prompt_tokens.inc(len(prompt_ids))
        times.start = times.last = time.perf_counter()
        async with aclosing(rt.stream(prompt_ids, params, request_id, continuation=continuation, lora=lora,
                                      after=after)) as stream:
            try:
                async for d in stream:
                    times.observe(d)
                    yield d
            except RequestRefused as e:  # it never started
                raise APIError(400, f"the request was refused: {e}", type="invalid_request_error") from e
    finally:
        state.metrics.request_success.labels(finished_reason=times.reason).inc()
        state.release()


async def collect(request: Request, deltas: AsyncIterator[StreamDelta]) -> tuple[str, StreamDelta]:
    """Run a non-streamed request to the end; abort it if the client disconnects first.

    Returns the full text and the final delta; a failed generation raises a 500.
    """
    async def run() -> tuple[str, StreamDelta]:
        parts, last = [], None
        async for d in deltas:
            parts.append(d.text)
            last = d
        return "".join(parts), last

    text, last = await until_disconnect(request, run())
    if not completed(last):
        raise failure(last)
    return text, last


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of ``work`` (a coroutine reading delta streams); if the client disconnects first,
    ``work`` is cancelled (the cancellation unwinds through the streams, whose cleanup aborts their
    requests in the engine) and a 499 is raised."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the client left (or this handler was cancelled)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "the client disconnected", code="client_closed_request")
    return task.result()


def completed(d: StreamDelta | None) -> bool:
    """True for the final delta of a generation that finished (stop or length)."""
    return d is not None and d.finish_reason in ("stop", "length")


def ended_early(d: StreamDelta) -> bool:
    """True for the final delta of a generation that did not finish (error, abort, shutdown)."""
    return d.finish_reason is not None and not completed(d)


def failure(last: StreamDelta | None) -> APIError:
    """The error of a generation that did not finish: 503 when the server ended it (shutdown), else 500."""
    error = getattr(last, "error", None)
    if error == SHUTTING_DOWN:
        return APIError(503, f"{SHUTTING_DOWN}; the request was ended before its reply was complete",
                        type="service_unavailable_error", code="shutting_down")
    return APIError(500, f"generation failed: {error or 'aborted'}", type="server_error")


# ---------------------------------------------------------------------------------------------- SSE

_LINE_SEPARATORS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse_json(payload: str) -> str:
    """Escape the Unicode line separators that JSON leaves raw: SSE clients that split lines with
    ``str.splitlines`` (httpx ``aiter_lines``, many scripts) would otherwise cut an event in two."""
    return payload.translate(_LINE_SEPARATORS)


def text_chunks(render: Callable[[str], str]) -> Callable[[str], str]:
    """A fast ``render`` for streamed text: the chunk around a text is rendered once (by ``render``,
    pydantic) and each text is JSON-escaped into it, so the per-token cost is one ``json.dumps``.
    The output is byte-for-byte what ``render(text)`` gives."""
    marker = "\x00telechat-text\x00"
    head, tail = render(marker).split(sse_json(json.dumps(marker, ensure_ascii=False)))
    return lambda text: head + sse_json(json.dumps(text, ensure_ascii=False)) + tail


class StreamFailed(Exception):
    """A generation that ended without finishing, as the error to send in-band."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


def _sse_error(e: APIError) -> str:
    """An error event in the middle of a stream (the HTTP status is already sent)."""
    return sse_json(json.dumps(e.body(), ensure_ascii=False))


def _check(d: StreamDelta) -> bool:
    """True for the final delta of a successful generation; raises :class:`StreamFailed` for a failed one."""
    if ended_early(d):
        raise StreamFailed(failure(d))
    return d.finish_reason is not None


async def _terminated(rid: str, deltas: AsyncIterator[StreamDelta], events: AsyncIterator[str]
                      ) -> AsyncIterator[str]:
    """Pass ``events`` through; a failure becomes an in-band error event; the generation is always
    closed (aborting it if the client left) and the stream always ends with ``[DONE]``."""
    try:
        async for event in events:
            yield event
    except StreamFailed as e:
        log.warning("%s ended early: %s", rid, e)
        yield _sse_error(e.error)
    except APIError as e:  # refused by the engine after the response started
        log.info("%s: %s", rid, e.message)
        yield _sse_error(e)
    except Exception as e:  # noqa: BLE001 - fail this stream only, in-band
        log.exception("%s failed", rid)
        yield _sse_error(APIError(500, f"generation failed: {e}", type="server_error"))
    finally:
        await deltas.aclose()
    yield "[DONE]"


async def chat_events(rid: str, model: str, deltas: Choices, include_usage: bool, texts: TokenTexts | None = None
                      ) -> AsyncIterator[str]:
    """``chat.completion.chunk`` payloads: per choice (``index``) role first, then content (with
    ``logprobs`` when ``texts`` is given: the request asked), then ``finish_reason``; then (with
    ``include_usage``) one chunk with ``choices: []`` and ``usage``, then ``[DONE]``."""
    created = int(time.time())
    # With include_usage every chunk carries "usage": null except the last (OpenAI reference).
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse_json(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices,
                                            usage=usage).model_dump_json(exclude=exclude))

    content = [text_chunks(lambda text, i=i: chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=text))]))
               for i in range(len(deltas))]

    async def body() -> AsyncIterator[str]:
        for i in range(len(deltas)):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        finals = {}
        async for i, d in deltas.merged():
            final = _check(d)
            if texts is not None and d.logprobs:
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=d.text),
                                             logprobs=chat_logprobs(d.logprobs, texts))])
            elif d.text:
                yield content[i](d.text)
            if final:
                finals[i] = d
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason=d.finish_reason)])
        if include_usage:
            yield chunk([], deltas.usage(finals))

    async with aclosing(_terminated(rid, deltas, body())) as events:  # a client leaving closes it at once
        async for event in events:
            yield event


async def completion_events(rid: str, model: str, deltas: Choices, include_usage: bool,
                            texts: TokenTexts | None = None) -> AsyncIterator[str]:
    """``text_completion`` payloads: per choice (``index``) text chunks (with ``logprobs`` when ``texts``
    is given), a last one with ``finish_reason``; then optional usage, ``[DONE]``."""
    created = int(time.time())
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse_json(CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                           usage=usage).model_dump_json(exclude=exclude))

    text = [text_chunks(lambda t, i=i: chunk([CompletionChoice(text=t, index=i, finish_reason=None)]))
            for i in range(len(deltas))]
    builders = [CompletionLogprobsBuilder(texts) for _ in range(len(deltas))] if texts is not None else None

    async def body() -> AsyncIterator[str]:
        finals = {}
        async for i, d in deltas.merged():
            final = _check(d)
            logprobs = builders[i].build(d.logprobs) if builders is not None and d.logprobs is not None else None
            if final or logprobs is not None:
                yield chunk([CompletionChoice(text=d.text, index=i, logprobs=logprobs,
                                              finish_reason=d.finish_reason if final else None)])
            elif d.text:
                yield text[i](d.text)
            if final:
                finals[i] = d
        if include_usage:
            yield chunk([], deltas.usage(finals))

    async with aclosing(_terminated(rid, deltas, body())) as events:  # a client leaving closes it at once
        async for event in events:
            yield event
