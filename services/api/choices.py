"""Several generations answering one request: ``n`` choices per prompt (or ``best_of`` candidates of
which the ``n`` best are returned) and /v1/completions prompt lists (choice ``index`` = prompt
position × n + j, as OpenAI numbers them).

Each choice is an engine request of its own. The choices of one prompt share its KV cache: the
first is admitted at once, the others (``after`` it) once it has read its first token, when the
prompt's full blocks are in the prefix cache (docs/engine.md, "Several choices"). With a ``seed``,
choice j samples with ``seed + j``: reproducible, and the choices differ. One choice failing fails
the request (a 500, or an error event in a stream) and aborts the others; a client leaving aborts
them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fastapi import Request

from services.api import serving
from services.api.protocol.openai import Usage

if TYPE_CHECKING:
    from services.api.deps import ServerState
    from telechat.engine.sampling import SamplingParams
    from telechat.runtime import Runtime, StreamDelta


@dataclass
class Choices:
    """The delta streams of a request's choices, in ``index`` order, ``n`` per prompt."""

    streams: list[AsyncIterator[StreamDelta]]
    n: int = 1

    def __len__(self) -> int:
        return len(self.streams)

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        """The deltas of the one choice (callers that serve a single choice only)."""
        if len(self.streams) != 1:
            raise RuntimeError("iterating Choices directly needs exactly one choice")
        return self.streams[0].__aiter__()

    async def aclose(self) -> None:
        """Close every stream (aborting the generations still running)."""
        for s in self.streams:
            await s.aclose()

    async def merged(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """``(index, delta)`` of every choice as they come; each choice ends with its final delta."""
        if len(self.streams) == 1:
            async for d in self.streams[0]:
                yield 0, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[StreamDelta]) -> None:
            try:
                async for d in stream:
                    await queue.put((i, d))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            running = len(tasks)
            while running:
                i, d = await queue.get()
                if d is None:
                    running -= 1
                else:
                    yield i, d
            for t in tasks:  # a pump that raised re-raises here
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def usage(self, finals: dict[int, StreamDelta]) -> Usage:
        """Usage of the whole request: each prompt counted once, every choice's completion tokens."""
        firsts = [finals[i] for i in range(0, len(self.streams), self.n) if i in finals]
        return Usage.of(sum(d.prompt_tokens for d in firsts), sum(d.completion_tokens for d in finals.values()),
                        sum(d.cached_tokens for d in firsts))


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """Parameters of choice ``j`` of a prompt: its own seed (``seed + j``) when the request has one."""
    if j == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + j)  # the API's seeds are signed 64-bit: + j < 2**64 always


async def start(state: ServerState, rt: Runtime, prompts: list[tuple[list[int], SamplingParams]], request_id: str,
                n: int = 1, **kw) -> Choices:
    """Admit ``n`` choices of each ``(prompt ids, params)`` (429 before any response starts; the choices
    admitted before it are closed) and return their streams. ``kw`` go to :func:`serving.start`."""
    many = len(prompts) * n > 1
    streams: list[AsyncIterator[StreamDelta]] = []
    try:
        for i, (prompt, params) in enumerate(prompts):
            first = None
            for j in range(n):
                rid = f"{request_id}-{i * n + j}" if many else request_id
                streams.append(await serving.start(state, rt, prompt, choice_params(params, j), rid, after=first, **kw))
                first = first or rid
    except BaseException:
        await Choices(streams).aclose()
        raise
    return Choices(streams, n)


@dataclass
class Result:
    """One choice run to the end."""

    text: str
    last: StreamDelta
    logprobs: list | None


def mean_logprob(result: Result) -> float:
    """Mean log-probability per token of a choice's text (-inf for an empty one)."""
    lps = [entry[1] for entry in result.logprobs or []]
    return sum(lps) / len(lps) if lps else float("-inf")


def best(results: list[Result], per_prompt: int, n: int) -> list[Result]:
    """``best_of``: of each prompt's ``per_prompt`` candidates (consecutive), the ``n`` with the highest mean
    log-probability per token (OpenAI's "best"), best first; all of them in order when ``per_prompt == n``."""
    if per_prompt == n:
        return results
    out = []
    for start in range(0, len(results), per_prompt):
        group = results[start : start + per_prompt]
        out += sorted(group, key=mean_logprob, reverse=True)[:n]
    return out


async def collect(request: Request, choices: Choices) -> list[Result]:
    """Run every choice to the end (aborting all if the client disconnects); the first choice that
    fails raises its error (500, or 503 at shutdown) and the others are aborted."""
    async def run() -> list[Result]:
        parts: list[list[str]] = [[] for _ in choices.streams]
        logprobs: list[list | None] = [None] * len(choices)
        finals: dict[int, StreamDelta] = {}
        try:
            async for i, d in choices.merged():
                if serving.ended_early(d):
                    raise serving.failure(d)
                parts[i].append(d.text)
                if d.logprobs is not None:
                    logprobs[i] = (logprobs[i] or []) + d.logprobs
                if d.finish_reason:
                    finals[i] = d
        finally:
            await choices.aclose()
        if len(finals) < len(choices):
            raise serving.failure(None)
        return [Result("".join(parts[i]), finals[i], logprobs[i]) for i in range(len(choices))]

    return await serving.until_disconnect(request, run())
