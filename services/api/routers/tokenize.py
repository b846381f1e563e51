"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` (same request and response shapes), and
``/v1/embeddings``, answered with a clear 404: this server serves chat and completion models only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field, model_validator

from services.api import serving
from services.api.deps import RuntimeDep, require_api_key
from services.api.protocol.fields import NonEmptyText, Text
from services.api.protocol.openai import APIError, ChatMessage, ErrorResponse, _Request

router = APIRouter(tags=["tokenizer (vLLM-compatible)"], dependencies=[Depends(require_api_key)],
                   responses={s: {"model": ErrorResponse} for s in (400, 401, 404, 413)})


class TokenizeRequest(_Request):
    """A raw prompt (tokenized as ``/v1/completions`` does) or chat messages (as ``/v1/chat/completions``
    builds its prompt)."""

    model: Text | None = None
    prompt: NonEmptyText | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: bool = True
    """With ``messages``: end with the assistant marker (as a chat request does)."""
    continue_final_message: bool = False
    """With ``messages``: the last (assistant) message is left open, as a continued chat reply's prompt."""
    add_special_tokens: bool = False
    """With ``prompt``: add the tokenizer's special tokens (``/v1/completions`` adds none)."""

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' (a string) or 'messages' (a chat), not both")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, rt: RuntimeDep) -> TokenizeResponse:
    """The token ids of a prompt or of the prompt a chat request would build."""
    serving.check_model(rt, body.model)
    if body.prompt is not None:
        text, special = body.prompt, body.add_special_tokens
        serving.check_prompt_size(rt, [text], "prompt")
        ids = await serving.encode(lambda: rt.tokenizer(text, add_special_tokens=special)["input_ids"], "prompt")
    else:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        serving.check_prompt_size(rt, [m["content"] for m in messages], "messages")
        ids = await serving.encode(lambda: rt.chat.encode_prompt(
            messages, continue_final=body.continue_final_message, add_generation_prompt=body.add_generation_prompt),
            "messages")
    return TokenizeResponse(count=len(ids), max_model_len=rt.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, rt: RuntimeDep) -> DetokenizeResponse:
    """The text of token ids."""
    serving.check_model(rt, body.model)
    vocab = rt.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=rt.tokenizer.decode(body.tokens))


@router.post("/v1/embeddings", status_code=404, response_model=ErrorResponse)
async def embeddings() -> None:
    """Not served: this server runs chat and completion (generative) models only."""
    raise APIError(404, "embeddings are not available: this server serves chat and completion models only "
                   "(/v1/chat/completions, /v1/completions)", code="unsupported_endpoint")
