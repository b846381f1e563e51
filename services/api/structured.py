"""Structured output and forced tool calls of the OpenAI routes: from a request to the grammar its
reply must match (:class:`~telechat.engine.guided.GrammarSpec`, checked here before queuing so a bad
schema or regex is a 400 naming its field; services/api/grammar_check.py), and from a constrained reply
to OpenAI ``tool_calls``, whole or streamed (docs/engine.md, "Constrained decoding").
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from services.api.grammar_check import GrammarChecker
from services.api.protocol.openai import (
    APIError,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    NamedToolChoice,
    ToolCall,
    ToolCallFunction,
    Usage,
)
from telechat.engine.guided import (
    GrammarError,
    GrammarSpec,
    any_json_object,
    bound_json_schema,
    json_bounds,
)

EMPTY_PARAMETERS = {"type": "object", "properties": {}}
"""The parameters of a function that declares none."""


@dataclass
class ToolPlan:
    """A forced tool call: which functions, and how the reply is read back."""

    functions: dict[str, dict[str, Any]]
    """name -> the function's definition (``name``, ``description``, ``parameters``)."""
    named: str | None
    """The one function a named choice forces (the reply is its arguments); None for "required"
    (the reply is a JSON list of ``{"name", "arguments"}``)."""
    parallel: bool
    legacy: bool
    """Forced through the deprecated ``function_call``: answered as ``message.function_call``."""


def _functions(defs: list[dict[str, Any]] | None, *, legacy: bool, param: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, d in enumerate(defs or []):
        f = d if legacy else (d.get("function") if isinstance(d, dict) and d.get("type") == "function" else None)
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            shape = "{'name': ..., 'parameters': {...}}" if legacy else \
                "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}"
            raise APIError(400, f"{param}[{i}] must be {shape}", param=param)
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(400, f"{param}[{i}].parameters must be a JSON schema object", param=param)
        out[f["name"]] = f
    return out


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    """The forced call of a chat request (``tool_choice`` "required" or named, ``function_call``
    named), or None when the reply is text. 400 for a choice that names no declared function."""
    choice, legacy = body.tool_choice, False
    if choice is None and body.function_call is not None and not isinstance(body.function_call, str):
        choice, legacy = body.function_call, True
    if choice is None or isinstance(choice, str) and choice in ("none", "auto"):
        return None
    param = "function_call" if legacy else "tool_choice"
    defs = body.functions if legacy else body.tools
    if not defs:
        raise APIError(400, f"{param} forces a call but no {'functions' if legacy else 'tools'} are given",
                       param=param)
    functions = _functions(defs, legacy=legacy, param="functions" if legacy else "tools")
    named = None
    if choice != "required":
        named = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        if named not in functions:
            raise APIError(400, f"{param} names the function {named!r}, which is not among the "
                           f"{'functions' if legacy else 'tools'} ({', '.join(map(repr, functions))})", param=param)
    return ToolPlan(functions, named, parallel=body.parallel_tool_calls is not False and not legacy, legacy=legacy)


def _parameters(f: dict[str, Any]) -> dict[str, Any]:
    return f.get("parameters") or EMPTY_PARAMETERS


def _tool_schema(plan: ToolPlan, max_items: int) -> dict[str, Any]:
    if plan.named is not None:
        return _parameters(plan.functions[plan.named])
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _parameters(f)},
              "required": ["name", "arguments"], "additionalProperties": False} for name, f in plan.functions.items()]
    return {"type": "array", "minItems": 1, "maxItems": max(1, max_items // 4) if plan.parallel else 1,
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}


async def grammar_spec(body: ChatCompletionRequest | CompletionRequest, max_tokens: int, checker: GrammarChecker,
                       plan: ToolPlan | None = None) -> GrammarSpec | None:
    """The grammar a request's reply must match (None: free text), checked by ``checker`` (in a worker
    process, time-limited): a 400 names the field whose schema, regex or choices cannot be compiled, or
    not in time. Free-form JSON parts get the bounds of :func:`~telechat.engine.guided.json_bounds`
    (docs/engine.md: why)."""
    fmt = body.response_format
    asked: list[tuple[str, str, Any]] = []  # (param, kind, value)
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", "json_object", None))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        asked.append(("response_format", "json_schema" if schema is not None else "json_object", schema))
    if body.guided_json is not None:
        value = body.guided_json
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise APIError(400, f"guided_json is not valid JSON: {e}", param="guided_json") from e
        asked.append(("guided_json", "json_schema", value))
    if body.guided_regex is not None:
        asked.append(("guided_regex", "regex", body.guided_regex))
    if body.guided_choice is not None:
        asked.append(("guided_choice", "choice", body.guided_choice))
    if plan is not None:
        asked.append(("functions" if plan.legacy else "tools", "tools", plan))
    if len(asked) > 1:
        names = ", ".join(p for p, _, _ in asked)
        raise APIError(400, f"{names}: only one of them may constrain the reply", param=asked[1][0])
    if not asked:
        return None
    param, kind, value = asked[0]
    max_chars, max_items = json_bounds(max_tokens)
    if kind == "tools":
        kind, value = "json_schema", _tool_schema(value, max_items)
    if kind == "json_object":
        spec = GrammarSpec("json_schema", json.dumps(any_json_object(max_chars, max_items)))
    elif kind == "json_schema":
        if not isinstance(value, dict):
            raise APIError(400, f"{param}: the JSON schema must be an object", param=param)
        spec = GrammarSpec("json_schema", json.dumps(bound_json_schema(value, max_chars, max_items), ensure_ascii=False))
    elif kind == "choice":
        spec = GrammarSpec("choice", json.dumps(value, ensure_ascii=False))
    else:
        spec = GrammarSpec(kind, value)
    try:
        await checker.check(spec)
    except GrammarError as e:
        what = {"regex": "the regular expression", "choice": "the choices"}.get(spec.kind, "the JSON schema")
        raise APIError(400, f"{param}: {what} cannot be used: {e}", param=param) from e
    return spec


# ---------------------------------------------------------------------------------------------- replies

def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(plan: ToolPlan, text: str) -> list[ToolCallFunction] | None:
    """The calls in a complete constrained reply, or None when the text is not one (a ``stop`` string
    cut it short): the reply is then answered as text."""
    try:
        if plan.named is not None:
            json.loads(text)
            return [ToolCallFunction(name=plan.named, arguments=text)]
        return [ToolCallFunction(name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))
                for c in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        return None


def tool_calls(plan: ToolPlan, text: str) -> list[ToolCall] | None:
    """:func:`parse_calls` as ``tool_calls`` entries with fresh ids (None: answer in text)."""
    calls = parse_calls(plan, text)
    return None if calls is None else [ToolCall(id=new_call_id(), function=f) for f in calls]


async def tool_call_events(rid: str, model: str, plan: ToolPlan, deltas: AsyncIterator, include_usage: bool
                           ) -> AsyncIterator[str]:
    """``chat.completion.chunk`` payloads of a forced tool call: the role, then per call a chunk with
    ``index``, ``id``, ``type`` and the function name, then its arguments (a named call streams them as
    they are generated; "required" sends each call's once the list is complete), then
    ``finish_reason`` "tool_calls" ("length" if the budget ran out first), usage, ``[DONE]``. A call
    forced through the deprecated ``function_call`` streams ``delta.function_call`` the same way."""
    from services.api.serving import _check, _terminated, sse_json

    created = int(time.time())
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse_json(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices,
                                            usage=usage).model_dump_json(exclude=exclude))

    def call_chunk(index: int, name: str | None = None, arguments: str = "") -> str:
        function = DeltaFunction(name=name, arguments=arguments)
        if plan.legacy:
            return chunk([ChatChunkChoice(delta=DeltaMessage(function_call=function))])
        head = dict(id=new_call_id(), type="function") if name is not None else {}
        call = DeltaToolCall(index=index, function=function, **head)
        return chunk([ChatChunkChoice(delta=DeltaMessage(tool_calls=[call]))])

    async def body() -> AsyncIterator[str]:
        yield chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant"))])
        if plan.named is not None:
            yield call_chunk(0, plan.named)
        parts = []
        async for d in deltas:
            final = _check(d)
            parts.append(d.text)
            if plan.named is not None and d.text:
                yield call_chunk(0, arguments=d.text)
            if not final:
                continue
            calls = parse_calls(plan, "".join(parts)) if d.finish_reason == "stop" else None
            reason = ("function_call" if plan.legacy else "tool_calls") if calls is not None else d.finish_reason
            if plan.named is None and calls is not None:
                for i, f in enumerate(calls):
                    yield call_chunk(i, f.name)
                    yield call_chunk(i, arguments=f.arguments)
            elif plan.named is None:  # cut by the budget or a stop string: what was generated, as text
                yield chunk([ChatChunkChoice(delta=DeltaMessage(content="".join(parts)))])
            yield chunk([ChatChunkChoice(delta=DeltaMessage(), finish_reason=reason)])
            if include_usage:
                yield chunk([], Usage.of(d.prompt_tokens, d.completion_tokens, d.cached_tokens))

    async with aclosing(_terminated(rid, deltas, body())) as events:
        async for event in events:
            yield event
