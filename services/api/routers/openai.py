"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from services.api import choices, serving, structured
from services.api.deps import RuntimeDep, StateDep, require_api_key
from services.api.logprobs import CompletionLogprobsBuilder, chat_logprobs, token_texts
from services.api.protocol.openai import (
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerationDefaultsInfo,
    ModelCard,
    ModelList,
    ResponseMessage,
    new_id,
)
from telechat.chat_tools import flatten_tool_messages, with_tools

if TYPE_CHECKING:
    from telechat.runtime import Runtime

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 500, 503)}
STREAM = {"content": {"text/event-stream": {"description": "with `stream: true`: `data: {chunk}` events, "
                                            "then `data: [DONE]`"}}}
DEFAULT_UI_MAX_TOKENS = 1024  # suggested reply budget for UIs; the API itself defaults to the remaining context

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(require_api_key)],
                   responses=ERRORS)


@router.get("/models", response_model=ModelList)
async def list_models(rt: RuntimeDep) -> ModelList:
    """The served model, its aliases (``--served-model-name``), then its LoRA adapters (``parent`` = the model),
    with context length and sampling defaults (TeleChat extensions)."""
    adapters = rt.engine.lora_adapters.items()
    main = model_card(rt)
    return ModelList(data=[main] + [main.model_copy(update={"id": alias}) for alias in rt.aliases]
                     + [model_card(rt, name, path) for name, path in adapters])


def model_card(rt: Runtime, adapter: str | None = None, path: str | None = None) -> ModelCard:
    """The card of the served model, or of its LoRA adapter ``adapter`` loaded from ``path``."""
    d = rt.defaults
    defaults = GenerationDefaultsInfo(do_sample=d.do_sample, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                                      repetition_penalty=d.repetition_penalty,
                                      max_tokens=min(DEFAULT_UI_MAX_TOKENS, rt.max_model_len // 2))
    return ModelCard(id=adapter or rt.name, created=int(rt.loaded_at), root=path or str(rt.path),
                     parent=rt.name if adapter else None, max_model_len=rt.max_model_len,
                     telechat_demo=rt.is_demo, generation_defaults=defaults)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: STREAM})
async def chat_completions(body: ChatCompletionRequest, request: Request, rt: RuntimeDep, state: StateDep):
    """Chat in the TeleChat format; streams SSE chunks with ``stream: true``."""
    lora = serving.check_model(rt, body.model)
    model = lora or serving.served_name(rt, body.model)
    serving.check_request_fields(rt, body, request)
    plan = structured.tool_plan(body)
    if plan is not None and body.stream and body.choices_per_prompt > 1:
        raise APIError(400, "n > 1 is not supported for streamed tool calls", param="n")
    messages = flatten_tool_messages([m.model_dump(include={"role", "tool_calls", "function_call"}) | {"content": m.text()}
                                      for m in body.messages])
    if plan is not None:
        messages = with_tools(messages, plan.functions.values())
    serving.check_prompt_size(rt, [m["content"] for m in messages], "messages")
    prompt = await serving.encode(lambda: rt.chat.encode_prompt(
        messages, continue_final=body.continues_final_message, add_generation_prompt=body.add_generation_prompt),
        "messages")
    max_tokens = serving.resolve_max_tokens(rt, len(prompt), body.requested_max_tokens)
    guided = await structured.grammar_spec(body, max_tokens, state.grammars, plan)
    params = serving.build_params(lambda: replace(body.to_sampling_params(rt.sampling_params, max_tokens),
                                                  guided=guided))
    rid = new_id("chatcmpl")
    # A continued answer is decoded in the context of its beginning (as a raw completion is).
    deltas = await choices.start(state, rt, [(prompt, params)], rid, body.choices_per_prompt, lora=lora,
                                 continuation=body.continues_final_message)
    texts = token_texts(rt.tokenizer) if body.logprobs else None
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        if plan is not None:
            return EventSourceResponse(structured.tool_call_events(rid, model, plan, deltas, usage), sep="\n")
        return EventSourceResponse(serving.chat_events(rid, model, deltas, usage, texts), sep="\n")
    results = await choices.collect(request, deltas)
    out = []
    for i, r in enumerate(results):
        message, reason = ResponseMessage(content=r.text), r.last.finish_reason
        calls = structured.tool_calls(plan, r.text) if plan is not None and reason == "stop" else None
        if calls is not None:
            message = (ResponseMessage(content=None, function_call=calls[0].function) if plan.legacy
                       else ResponseMessage(content=None, tool_calls=calls))
            reason = "function_call" if plan.legacy else "tool_calls"
        out.append(ChatChoice(index=i, message=message, finish_reason=reason,
                              logprobs=chat_logprobs(r.logprobs or [], texts) if texts is not None else None))
    return ChatCompletionResponse(id=rid, model=model, choices=out,
                                  usage=deltas.usage({i: r.last for i, r in enumerate(results)}))


@router.post("/completions", response_model=CompletionResponse, responses={200: STREAM})
async def completions(body: CompletionRequest, request: Request, rt: RuntimeDep, state: StateDep):
    """Continue a raw prompt: a string or token ids. No chat format is applied, and marker strings in
    a string prompt are read as the markers (raw access, as the official tokenizer does)."""
    lora = serving.check_model(rt, body.model)
    model = lora or serving.served_name(rt, body.model)
    serving.check_request_fields(rt, body, request)
    values = body.prompt_values
    strings = [v for v in values if isinstance(v, str)]
    if strings:
        serving.check_prompt_size(rt, strings, "prompt")
    prompts = []
    for value in values:
        if isinstance(value, str):
            prompt = await serving.encode(lambda v=value: rt.tokenizer(v, add_special_tokens=False)["input_ids"],
                                          "prompt")
        else:
            prompt, vocab = list(value), rt.vocab_size
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        max_tokens = serving.resolve_max_tokens(rt, len(prompt), body.requested_max_tokens)
        guided = await structured.grammar_spec(body, max_tokens, state.grammars)
        prompts.append((prompt, serving.build_params(
            lambda: replace(body.to_sampling_params(rt.sampling_params, max_tokens), guided=guided))))
    rid = new_id("cmpl")
    candidates = body.candidates_per_prompt
    if candidates > body.choices_per_prompt:  # best_of: the candidates are ranked by their log-probabilities
        prompts = [(p, sp if sp.logprobs is not None else replace(sp, logprobs=0)) for p, sp in prompts]
    deltas = await choices.start(state, rt, prompts, rid, candidates, continuation=True, lora=lora)
    texts = token_texts(rt.tokenizer) if body.logprobs is not None else None
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(serving.completion_events(rid, model, deltas, usage, texts), sep="\n")
    results = await choices.collect(request, deltas)
    usage = deltas.usage({i: r.last for i, r in enumerate(results)})  # every candidate's tokens count
    return CompletionResponse(id=rid, model=model, choices=[
        CompletionChoice(text=r.text, index=i, finish_reason=r.last.finish_reason,
                         logprobs=CompletionLogprobsBuilder(texts).build(r.logprobs or []) if texts is not None else None)
        for i, r in enumerate(choices.best(results, candidates, body.choices_per_prompt))], usage=usage)
