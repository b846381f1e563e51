"""OpenAI-compatible schemas, ordered as in the official OpenAI API reference; TeleChat extras are
grouped at the end of each request and marked "not in OpenAI spec" (as vLLM does).

Validation is strict (no string → number, no bool → number coercion; floats finite) and every range
is in the published schema. Unknown fields are ignored (clients send many). Fields we cannot honour
get a 400 naming the field where ignoring them would change the answer: ``echo``, ``suffix``,
non-text content parts.
Structured output (``response_format`` json_object/json_schema, ``guided_*``) and forced tool calls
(``tool_choice`` "required" or a named function, legacy ``function_call``) are enforced by
grammar-constrained decoding (docs/engine.md). ``tools``/``functions`` with ``tool_choice`` absent,
"auto" or "none" are answered in text: the TeleChat v1 chat format defines no tool-call syntax to
parse (Open WebUI sends its built-in tools with every chat).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from services.api.protocol.fields import NonEmptyText, Seed, Text

if TYPE_CHECKING:
    from telechat.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`
MIN_TEMPERATURE = 1e-3
"""Smallest positive temperature: below it logits / temperature overflow; 0 means greedy."""
MAX_TOP_K = 2**31 - 1
MAX_CHOICES = 128
"""Most choices one request may ask for (OpenAI's limit on ``n``; with a prompt list, prompts × n)."""
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on chat ``top_logprobs``
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on completions ``logprobs``
MAX_BEST_OF = 20  # OpenAI's limit on ``best_of``


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


def unsupported(field: str, what: str, hint: str = "") -> PydanticCustomError:
    """The validation error of a field value we cannot honour: a 400 naming ``field`` (as ``param``)."""
    return PydanticCustomError("unsupported", "{field}: {what} is not supported by this server{hint}",
                               {"field": field, "what": what, "hint": f"; {hint}" if hint else ""})


def _int(data: dict, name: str) -> int | None:
    v = data.get(name)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def refuse_unsupported(data: Any, *, chat: bool) -> None:
    """Raise :func:`unsupported` for the first value in a raw request body that asks for a feature
    this server lacks. Runs before the schema (whose bounds exclude the same values) so the error
    says what is missing rather than "should be less than or equal to 1"."""
    if not isinstance(data, dict):
        return
    if not chat:
        if data.get("echo") is True:
            raise unsupported("echo", "echoing the prompt")
        if isinstance(data.get("suffix"), str) and data["suffix"]:
            raise unsupported("suffix", "a suffix (insertion)")


# ---------------------------------------------------------------------------------------------- requests

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before ``[DONE]`` with ``choices: []`` and the request's ``usage``."""


class TextPart(_Request):
    type: Literal["text"]
    text: Text


Role = Literal["system", "developer", "user", "assistant", "bot", "tool"]


class ChatMessage(_Request):
    role: Role
    """system | developer (read as system, as vLLM does) | user | assistant (``bot``, the TeleChat name, is
    accepted as assistant) | tool (a tool's
    result, rendered as in docs/chat-format.md)."""
    content: Text | list[TextPart] | None = None
    """A string, or text parts that are joined (the model takes text only); may be null in an
    assistant message with ``tool_calls``."""
    name: Text | None = None
    """Accepted and not used."""
    tool_calls: list[MessageToolCall] | None = None
    """Calls an assistant message made (history)."""
    tool_call_id: Text | None = None
    """The call a tool message answers."""
    function_call: FunctionCall | None = None
    """The call an assistant message made (deprecated ``functions`` API, history)."""

    @model_validator(mode="before")
    @classmethod
    def _content_shape(cls, data: Any) -> Any:
        # Clear messages for the shapes clients get wrong, before the union's own errors.
        if not isinstance(data, dict):
            return data
        content = data.get("content")
        if content is None:
            if data.get("role") == "assistant" and (data.get("tool_calls") or data.get("function_call")):
                return data
            raise ValueError("content is required (a string or a list of text parts)")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part of type {kind!r} is not supported: this model takes text only "
                                     "(send {'type': 'text', 'text': ...} parts or a string)")
        elif not isinstance(content, str):
            raise ValueError(f"content must be a string or a list of text parts, got {type(content).__name__}")
        return data

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class JSONSchemaFormat(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """The JSON schema the reply must validate against (absent: any JSON object)."""
    strict: bool | None = None
    """Accepted; the schema is always enforced (grammar-constrained decoding)."""


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    """``text``; ``json_object``: the reply is a JSON object; ``json_schema``: it validates against ``json_schema.schema``."""
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object "
                             "({'name': ..., 'schema': {...}})")
        return self


class FunctionName(_Request):
    name: NonEmptyText


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Request):
    name: NonEmptyText
    arguments: Text
    """The arguments as JSON text (as the model wrote them)."""


class MessageToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


StopField = Annotated[NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)] | None,
                      Field(description=f"Up to {MAX_STOP_STRINGS} non-empty strings that end the reply "
                                        "(not included in it).")]


class _SamplingFields(_Request):
    """Sampling fields shared by chat and completions requests (each declares its own order)."""

    def _sampling_overrides(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
                    top_k=self.top_k, repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                    logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, min_p=self.min_p,
                    min_tokens=self.min_tokens, logprobs=self.logprobs_count,
                    include_stop_str_in_output=self.include_stop_str_in_output)

    @property
    def logprobs_count(self) -> int | None:
        """Alternatives to return per token (None: no log-probabilities)."""
        raise NotImplementedError

    @property
    def choices_per_prompt(self) -> int:
        """``n``."""
        return self.n or 1

    def to_sampling_params(self, defaults: Callable[..., SamplingParams], max_tokens: int) -> SamplingParams:
        """Engine parameters: request values > the checkpoint's generation_config (``defaults``, e.g.
        ``Runtime.sampling_params``) > OpenAI defaults. ``max_tokens`` is already resolved against the context.
        ``stop_token_ids`` add to the chat format's. Raises ``ValueError`` for values the engine refuses."""
        params = defaults(max_tokens=max_tokens, **self._sampling_overrides())
        if self.stop_token_ids:
            params.stop_token_ids = list(dict.fromkeys([*params.stop_token_ids, *self.stop_token_ids]))
        return params

    def token_ids_used(self) -> list[int]:
        """Token ids the request names (``logit_bias`` keys, ``stop_token_ids``), to check against the vocabulary."""
        return [int(k) for k in self.logit_bias or {}] + list(self.stop_token_ids or [])


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

def _zero_or_min_temperature(v: float | None) -> float | None:
    if v is not None and 0 < v < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {v}")
    return v


Temperature = Annotated[float | None, Field(ge=0, le=2), AfterValidator(_zero_or_min_temperature), WithJsonSchema({
    "anyOf": [{"const": 0}, {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2}, {"type": "null"}],
    "description": f"0 = greedy; otherwise {MIN_TEMPERATURE} to 2."})]
TopP = Annotated[float | None, Field(gt=0, le=1)]
TopK = Annotated[int | None, Field(ge=0, le=MAX_TOP_K, description="Keep the k most likely tokens; 0 keeps all.")]
RepetitionPenalty = Annotated[float | None, Field(ge=0.01, le=100, description=">1 discourages repeats "
                                                  "(TeleChat generation_config uses 1.01-1.03).")]
OpenAIPenalty = Annotated[float | None, Field(ge=-2, le=2, description="OpenAI's additive penalty: subtracted from "
                                              "a token's logit per occurrence (frequency) or once (presence) in "
                                              "the reply so far.")]


def _token_id_keys(v: dict[str, float] | None) -> dict[str, float] | None:
    for key in v or {}:
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"logit_bias keys are token ids written as strings of digits (e.g. \"1234\"), got {key!r}")
    return v


LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]] | None, AfterValidator(_token_id_keys),
                      Field(description="Token id (as a string) -> value added to its logit before sampling, "
                                        "-100 (ban) to 100 (force).")]
MinP = Annotated[float | None, Field(ge=0, le=1, description="Drop tokens whose probability is below min_p "
                                     "times the most likely one's (after temperature).")]
MinTokens = Annotated[int, Field(ge=0, description="Stop tokens and stop strings are ignored until the reply "
                                 "has this many tokens.")]
StopTokenIds = Annotated[list[Annotated[int, Field(ge=0)]] | None, Field(description="Token ids that end the "
                         "reply too (besides the chat format's end token); not included in it.")]
N = Annotated[int | None, Field(ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt "
                                f"(1 to {MAX_CHOICES}); they share the prompt's KV cache.")]


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(json_schema_extra={"examples": [_CHAT_EXAMPLE]})

    messages: list[ChatMessage] = Field(min_length=1)
    model: Text | None = None
    """Served model id; optional here (not in OpenAI spec: there it is required)."""
    frequency_penalty: OpenAIPenalty = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    """Deprecated by OpenAI: ``{"name": ...}`` forces a call of that function (grammar-constrained);
    "auto"/"none": the answer is text."""
    functions: list[dict[str, Any]] | None = None
    """Deprecated by OpenAI: the functions ``function_call`` may name."""
    logit_bias: LogitBias = None
    logprobs: bool | None = None
    """Return each reply token's log-probability (the model's raw distribution)."""
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: N = None
    parallel_tool_calls: bool | None = None
    presence_penalty: OpenAIPenalty = None
    response_format: ResponseFormat | None = None
    """``text``, ``json_object`` or ``json_schema`` (enforced by grammar-constrained decoding)."""
    seed: Seed | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """"required" or a named function: the reply is tool calls whose arguments validate against the
    tools' parameter schemas; "auto"/"none": the answer is text."""
    tools: list[dict[str, Any]] | None = None
    """Functions the model may call (``{"type": "function", "function": {"name", "parameters", ...}}``)."""
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """The most likely alternatives to return with each token (needs ``logprobs: true``)."""
    top_p: TopP = None
    user: Text | None = None
    # --- not in OpenAI spec
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` tokens (benchmarks)."""
    min_p: MinP = None
    min_tokens: MinTokens = 0
    stop_token_ids: StopTokenIds = None
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended the reply at its end."""
    continue_final_message: bool | None = None
    """Continue the last (assistant) message instead of starting a new one (vLLM's semantics); unset: on
    exactly when the last message is the assistant's (Open WebUI's "Continue Response")."""
    add_generation_prompt: bool = True
    """End the prompt with the assistant marker ``<_bot>`` (false: leave it out; unused when continuing)."""
    guided_json: dict[str, Any] | Text | None = None
    """The reply validates against this JSON schema (vLLM's extension; like ``response_format`` json_schema)."""
    guided_regex: Text | None = None
    """The reply matches this regular expression (vLLM's extension)."""
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    """The reply is exactly one of these strings (vLLM's extension)."""

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        refuse_unsupported(data, chat=True)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.continue_final_message and self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: a continued "
                             "message gets no new assistant marker")
        last = self.messages[-1].role
        if self.continue_final_message and last not in ("assistant", "bot"):
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if self.continue_final_message is False and last in ("assistant", "bot"):
            raise ValueError("the last message is the assistant's: leave continue_final_message unset (or true) "
                             "to continue it, or end with a user message")
        return self

    @property
    def continues_final_message(self) -> bool:
        """The reply continues the last (assistant) message."""
        return self.messages[-1].role in ("assistant", "bot") and self.continue_final_message is not False

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens`` (deprecated alias)."""
        return self.max_completion_tokens or self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (raw text continuation, no chat format: marker strings in the prompt
    are read as the markers)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "telechat-demo", "prompt": "中国的首都是", "max_tokens": 32, "temperature": 0}]})

    model: Text | None = None
    """Served model id; optional here (not in OpenAI spec)."""
    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_CHOICES)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)])
    """A prompt (a string or token ids) or a list of prompts (strings or token-id lists), each answered by
    ``n`` choices: choice ``index`` = prompt position × n + j."""
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    """Generate this many candidates per prompt and return the ``n`` with the highest mean log-probability
    per token (OpenAI's "best"); at least ``n``; not with ``stream`` when above ``n``."""
    echo: Literal[False] = False
    """Only false is supported."""
    frequency_penalty: OpenAIPenalty = None
    logit_bias: LogitBias = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    """Return each token's log-probability and this many most likely alternatives."""
    max_tokens: int | None = Field(16, ge=1)
    n: N = None
    presence_penalty: OpenAIPenalty = None
    seed: Seed | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: Literal[""] | None = None
    """Not supported (only empty)."""
    temperature: Temperature = None
    top_p: TopP = None
    user: Text | None = None
    # --- not in OpenAI spec
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: bool = False
    min_p: MinP = None
    min_tokens: MinTokens = 0
    stop_token_ids: StopTokenIds = None
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    """Structured output as in chat requests (vLLM's extension of completions)."""
    guided_json: dict[str, Any] | Text | None = None
    """The reply validates against this JSON schema (vLLM's extension; like ``response_format`` json_schema)."""
    guided_regex: Text | None = None
    """The reply matches this regular expression (vLLM's extension)."""
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    """The reply is exactly one of these strings (vLLM's extension)."""

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        refuse_unsupported(data, chat=False)
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        # One sentence for the shapes the union would describe branch by branch.
        def ids_ok(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(type(t) is int and t >= 0 for t in x)

        if (isinstance(v, str) and v) or ids_ok(v):
            return v
        if isinstance(v, list) and 0 < len(v) <= MAX_CHOICES and (all(isinstance(p, str) and p for p in v)
                                                                   or all(ids_ok(p) for p in v)):
            return v
        raise ValueError("send a prompt: a non-empty string or a non-empty list of token ids (integers >= 0), or a "
                         f"list of 1 to {MAX_CHOICES} prompts of one kind (strings, or token-id lists)")

    @model_validator(mode="after")
    def _choice_count(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.choices_per_prompt})")
        if self.stream and self.candidates_per_prompt > self.choices_per_prompt:
            raise ValueError("best_of above n cannot be streamed: the best candidates are known only at the end")
        if len(self.prompt_values) * self.candidates_per_prompt > MAX_CHOICES:
            raise ValueError(f"{len(self.prompt_values)} prompts × {self.candidates_per_prompt} choices (n, best_of) "
                             f"is more than {MAX_CHOICES} choices in one request")
        return self

    @property
    def candidates_per_prompt(self) -> int:
        """Generations per prompt: ``best_of``, else ``n``."""
        return self.best_of or self.choices_per_prompt

    @property
    def prompt_values(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------------------------------------- responses

class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV came from the prefix cache (not recomputed)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ToolCallFunction(BaseModel):
    name: str
    arguments: str
    """JSON text."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """Null when the reply is ``tool_calls``."""
    tool_calls: list[ToolCall] | None = None
    function_call: ToolCallFunction | None = None
    """The deprecated ``functions`` API's one call."""

    @model_serializer(mode="wrap")
    def _drop_unset_calls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k == "content"}


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    """The token's UTF-8 bytes (a token may hold part of a character)."""


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    """The most likely tokens at this position, most likely first (``top_logprobs`` of them)."""


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    """One entry per reply token."""


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    """Per token, the ``logprobs`` most likely tokens and their log-probabilities."""
    text_offset: list[int]
    """Where each token's text starts in the reply (characters)."""


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str = ""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: ``index``, ``id``, ``type`` and the name first, then arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(BaseModel):
    """Only the fields a chunk carries: ``{"role", "content"}`` first, ``{"content"}`` next, ``{}`` last."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: DeltaFunction | None = None
    """The deprecated ``functions`` API's call, streamed: the name first, then the arguments."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


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
    logprobs: CompletionLogprobs | None = None
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
    root: str | None = None
    """Where the weights come from (vLLM): the checkpoint folder, or a LoRA adapter's folder."""
    parent: str | None = None
    """A LoRA adapter's base model id (vLLM); None for the base model."""
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
