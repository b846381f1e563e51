"""Official TeleChat service routes (docs/legacy-api.md): ``/telechat/gptDialog/v2`` streams raw UTF-8 text,
``/v4`` answers ``{"role": "bot", "content": reply}``."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.api import serving
from services.api.deps import RuntimeDep, StateDep, require_api_key
from services.api.protocol.legacy import DIALOG, FAILED, RANGE, DialogReply, DialogRequest, LegacyError, LegacyErrorBody
from services.api.protocol.openai import APIError, ErrorResponse, new_id

log = logging.getLogger(__name__)
ERRORS = {**{s: {"model": LegacyErrorBody} for s in (400, 429, 500, 503)},
          **{s: {"model": ErrorResponse, "description": "decided before the route: OpenAI error body"}
             for s in (401, 413)}}

router = APIRouter(prefix="/telechat/gptDialog", tags=["TeleChat legacy"], dependencies=[Depends(require_api_key)],
                   responses=ERRORS)


def _trim(messages: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """Drop what cannot fit before tokenizing: oldest (user, bot) pairs while the contents exceed
    ``limit`` bytes, then the question's oldest characters. Token-level truncation would drop the
    same (no text over ``limit`` bytes fits), so the prompt is unchanged, only found faster."""
    size = [len(m["content"].encode("utf-8")) for m in messages]
    while len(messages) > 1 and sum(size) > limit:
        messages, size = messages[2:], size[2:]
    if size[-1] > limit:
        messages[-1] = {"role": "user", "content": messages[-1]["content"][-limit:]}
    return messages


async def _prepare(body: DialogRequest, rt: RuntimeDep):
    """Prompt ids and sampling parameters as the official chat() builds them: ``max_length`` bounds
    prompt + reply, and the prompt is truncated (oldest turns first) to leave room for a reply."""
    budget = min(body.max_length, rt.max_model_len)
    if budget < 4:  # <_user>, one token, <_bot>, and one reply token
        raise LegacyError(RANGE, f"max_length={body.max_length} leaves no room for a prompt and a reply")
    messages = _trim(body.messages(), rt.max_prompt_bytes)
    try:
        prompt = await serving.encode(lambda: rt.chat.encode_prompt(messages, max_tokens=budget - 1), "dialog")
    except APIError as e:
        raise LegacyError(DIALOG, e.message) from e
    return prompt, serving.build_params(lambda: body.to_sampling_params(rt.sampling_params, budget - len(prompt)))


def _error_line(e: APIError) -> bytes:
    """The last line of a ``/v2`` stream that ended early: a newline and the official error body."""
    body = LegacyError(FAILED, e.message, e.status).body()
    return ("\n" + json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8")


@router.post("/v2", response_class=StreamingResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "the reply as raw UTF-8 text chunks"}})
async def dialog_stream(body: DialogRequest, rt: RuntimeDep, state: StateDep):
    """Stream the reply as plain UTF-8 text: no framing, no end marker; chunks never split a character.

    A generation that fails before any text gets an error status with the official error body; one
    that ends early after text was sent (e.g. server shutdown) ends with a newline and the official
    error body as JSON on its own line."""
    prompt, params = await _prepare(body, rt)
    deltas = await serving.start(state, rt, prompt, params, new_id("dialog"))
    first = await anext(deltas, None)
    if first is None or serving.ended_early(first):
        await deltas.aclose()
        e = serving.failure(first)
        return JSONResponse(LegacyError(FAILED, e.message).body(), status_code=e.status)

    async def text():
        try:
            d = first
            while d is not None:
                if d.text:
                    yield d.text.encode("utf-8")
                if serving.ended_early(d):
                    yield _error_line(serving.failure(d))
                d = await anext(deltas, None)
        except Exception as e:  # noqa: BLE001 - this stream only, ended with its error line
            log.exception("legacy stream failed")
            yield _error_line(APIError(500, f"generation failed: {e}", type="server_error"))
        finally:
            await deltas.aclose()

    # The official service said text/html; the body is plain text, so we say so (same bytes).
    return StreamingResponse(text(), media_type="text/plain; charset=utf-8")


@router.post("/v4", response_model=DialogReply)
async def dialog(body: DialogRequest, request: Request, rt: RuntimeDep, state: StateDep) -> DialogReply:
    """The whole reply at once."""
    prompt, params = await _prepare(body, rt)
    deltas = await serving.start(state, rt, prompt, params, new_id("dialog"))
    text, _ = await serving.collect(request, deltas)
    return DialogReply(content=text)
