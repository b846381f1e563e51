"""Official TeleChat service routes (SPEC.md §6): ``/telechat/gptDialog/v2`` streams raw UTF-8 text,
``/v4`` answers ``{"role": "bot", "content": reply}``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from services.api import serving
from services.api.deps import RuntimeDep, StateDep, require_api_key
from services.api.protocol.legacy import DIALOG, RANGE, DialogReply, DialogRequest, LegacyError
from services.api.protocol.openai import new_id

router = APIRouter(prefix="/telechat/gptDialog", tags=["TeleChat legacy"], dependencies=[Depends(require_api_key)])


def _prepare(body: DialogRequest, rt: RuntimeDep):
    """Prompt ids and sampling parameters as the official chat() builds them: ``max_length`` bounds
    prompt + reply, and the prompt is truncated (oldest turns first) to leave room for a reply."""
    budget = min(body.max_length, rt.max_model_len)
    if budget < 4:  # <_user>, one token, <_bot>, and one reply token
        raise LegacyError(RANGE, f"max_length={body.max_length} leaves no room for a prompt and a reply")
    try:
        prompt = rt.chat.encode_prompt(body.messages(), max_tokens=budget - 1)
    except ValueError as e:
        raise LegacyError(DIALOG, str(e)) from e
    return prompt, serving.build_params(lambda: body.to_sampling_params(rt.sampling_params, budget - len(prompt)))


@router.post("/v2", response_class=StreamingResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "the reply as raw UTF-8 text chunks"}})
async def dialog_stream(body: DialogRequest, rt: RuntimeDep, state: StateDep) -> StreamingResponse:
    """Stream the reply as plain UTF-8 text: no framing, no end marker; chunks never split a character."""
    prompt, params = _prepare(body, rt)
    deltas = await serving.start(state, rt, prompt, params, new_id("dialog"))

    async def text():
        try:
            async for d in deltas:
                if d.text:
                    yield d.text.encode("utf-8")
        finally:
            await deltas.aclose()

    # The official service said text/html; the body is plain text, so we say so (same bytes).
    return StreamingResponse(text(), media_type="text/plain; charset=utf-8")


@router.post("/v4", response_model=DialogReply)
async def dialog(body: DialogRequest, request: Request, rt: RuntimeDep, state: StateDep) -> DialogReply:
    """The whole reply at once."""
    prompt, params = _prepare(body, rt)
    deltas = await serving.start(state, rt, prompt, params, new_id("dialog"))
    text, _ = await serving.collect(request, deltas)
    return DialogReply(content=text)
