"""OpenAI-compatible schemas, ordered as in the official OpenAI API reference; TeleChat extras are
grouped at the end of each request and marked "not in OpenAI spec" (as vLLM does).

Unknown request fields are ignored (clients send many); fields we cannot honour (``n`` > 1,
``logprobs``, ``echo``, ``suffix``, ``best_of`` > 1) are rejected with a 400 that says so.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

if TYPE_CHECKING:
    from telechat.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------- requests

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before ``[DONE]`` with ``choices: []`` and the request's ``usage``."""


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    """system | user | assistant (``bot``, the TeleChat name, is accepted as assistant)."""
    content: str | list[TextPart] | None = None
    """A string, or text parts that are joined (images are not supported)."""

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _SamplingFields(_Request):
    """Sampling fields shared by chat and completions requests (each declares its own order)."""

    def _sampling_overrides(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
                    top_k=self.top_k, repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos)

    def to_sampling_params(self, defaults: Callable[..., SamplingParams], max_tokens: int) -> SamplingParams:
        """Engine parameters: request values > the checkpoint's generation_config (``defaults``, e.g.
        ``Runtime.sampling_params``) > OpenAI defaults. ``max_tokens`` is already resolved against the context.
        Raises ``ValueError`` for values the engine refuses."""
        return defaults(max_tokens=max_tokens, **self._sampling_overrides())


_CHAT_EXAMPLE = {
    "model": "telechat-demo",
    "messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好，请用一句话介绍一下中国电信星辰大模型。"},
    ],
    "max_tokens": 128,
    "temperature": 0.3,
    "stream": True,
    "stream_options": {"include_usage": True},
}


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [_CHAT_EXAMPLE]})

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    """Served model id; optional here (not in OpenAI spec: there it is required)."""
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    """Accepted for compatibility and ignored; use ``repetition_penalty``."""
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    """Accepted for compatibility and ignored; use ``repetition_penalty``."""
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # --- not in OpenAI spec
    top_k: int | None = Field(None, ge=0)
    """Keep the k most likely tokens; 0 keeps all."""
    repetition_penalty: float | None = Field(None, gt=0)
    """>1 discourages repeats (TeleChat generation_config uses 1.01-1.03)."""
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` tokens (benchmarks)."""

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        _check_supported(n=self.n, stop=self.stop, logprobs=self.logprobs)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens`` (deprecated alias)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (raw text continuation, no chat format)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "telechat-demo", "prompt": "中国的首都是", "max_tokens": 32, "temperature": 0}]})

    model: str | None = None
    """Served model id; optional here (not in OpenAI spec)."""
    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt: a string or token ids (a list holding exactly one of them is accepted too)."""
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: int | None = None
    max_tokens: int | None = Field(16, ge=1)
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # --- not in OpenAI spec
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        _check_supported(n=self.n, stop=self.stop, logprobs=self.logprobs)
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            raise ValueError("echo, suffix and best_of are not supported")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(f"prompt: send one prompt per request (got {len(p)})")
            self.prompt = p[0]
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def _check_supported(*, n: int | None, stop: str | list[str] | None, logprobs: object) -> None:
    # ValueError inside a validator becomes a 400 naming the field list.
    if (n or 1) != 1:
        raise ValueError("n must be 1: one choice per request is supported")
    if logprobs:
        raise ValueError("logprobs are not supported")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop sequences")
    if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
        raise ValueError("stop: stop sequences must be non-empty strings")


# ---------------------------------------------------------------------------------------------- responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """Only the fields a chunk carries: ``{"role", "content"}`` first, ``{"content"}`` next, ``{}`` last."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    """Present (null until the last chunk) only with ``stream_options.include_usage``."""


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class GenerationDefaultsInfo(BaseModel):
    """The checkpoint's sampling defaults, for UIs (not in OpenAI spec)."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_tokens: int
    """Default reply budget of this server (the context minus a minimal prompt)."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "telechat-stack"
    # --- not in OpenAI spec
    max_model_len: int
    telechat_demo: bool
    generation_defaults: GenerationDefaultsInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error on OpenAI routes."""

    error: ErrorDetail
