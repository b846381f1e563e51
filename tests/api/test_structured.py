"""Structured output and tool calling against a live server over the demo model: the official
``openai`` client and LangChain (``with_structured_output``, ``bind_tools``), replies checked with
``jsonschema`` against the schemas sent."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from openai import OpenAI

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "country": {"enum": ["CN", "US", "FR"]}},
                "required": ["city", "country"], "additionalProperties": False},
}, "required": ["name", "age", "address"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1}},
        "required": ["sku", "qty"]}},
    "paid": {"type": "boolean"},
    "status": {"enum": ["new", "shipped", "done"]},
}, "required": ["items", "paid", "status"]}
FLAGS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^UTC[+-][0-9]{1,2}$"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "介绍一下你自己"}]


@pytest.fixture(scope="module")
def client(demo_server) -> OpenAI:
    return OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def streamed_text(stream) -> tuple[str, str]:
    parts, reason = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
    return "".join(parts), reason


@pytest.mark.parametrize("schema", [PERSON, ORDER, FLAGS], ids=["nested", "array-of-objects", "enum-array"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_schema_replies_validate(client, schema, stream):
    kw = dict(model="", messages=ASK, max_tokens=300, temperature=1.0, seed=7, stream=stream,
              response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}})
    if stream:
        text, reason = streamed_text(client.chat.completions.create(**kw))
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        text, reason = choice.message.content, choice.finish_reason
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_and_completions_route(client):
    chat = client.chat.completions.create(model="", messages=ASK, max_tokens=300, response_format={"type": "json_object"})
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    done = client.completions.create(model="", prompt="The answer:", max_tokens=300,
                                     extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                         "name": "p", "schema": PERSON}}})
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)


def test_guided_regex_choice_and_json(client):
    regex = r"[0-9]{3}-[a-z]{2,5}"
    for seed in range(3):
        r = client.completions.create(model="", prompt="code:", max_tokens=30, temperature=1.0, seed=seed,
                                      extra_body={"guided_regex": regex})
        assert re.fullmatch(regex, r.choices[0].text)
        r = client.chat.completions.create(model="", messages=ASK, max_tokens=30, temperature=1.0, seed=seed,
                                           extra_body={"guided_choice": ["是", "否", "不知道"]})
        assert r.choices[0].message.content in ("是", "否", "不知道")
    r = client.chat.completions.create(model="", messages=ASK, max_tokens=300, extra_body={"guided_json": json.dumps(FLAGS)})
    jsonschema.validate(json.loads(r.choices[0].message.content), FLAGS)


def test_free_requests_are_unchanged_beside_constrained_ones(client):
    """Greedy replies to free requests sent together with constrained ones equal those sent alone."""
    free = [dict(model="", messages=[{"role": "user", "content": q}], max_tokens=40, temperature=0)
            for q in ("你好", "谢谢", "写一首诗")]
    alone = [client.chat.completions.create(**kw).choices[0].message.content for kw in free]
    guided = dict(model="", messages=ASK, max_tokens=300, temperature=1.0,
                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.chat.completions.create, **guided) for _ in range(4)]
        futures += [pool.submit(client.chat.completions.create, **kw) for kw in free]
        replies = [f.result() for f in futures]
    assert [r.choices[0].message.content for r in replies[4:]] == alone
    for r in replies[:4]:
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def check_call(call, tools: list[dict]) -> None:
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id and call.function.name in spec
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])


def test_tool_choice_required_and_named(client):
    tools = [WEATHER, TIME]
    for seed in range(3):
        r = client.chat.completions.create(model="", messages=ASK, tools=tools, tool_choice="required", max_tokens=300,
                                           temperature=1.0, seed=seed, parallel_tool_calls=False)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0], tools)
    r = client.chat.completions.create(model="", messages=ASK, tools=tools, max_tokens=300,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    check_call(call, tools)
    legacy = client.chat.completions.create(model="", messages=ASK, functions=[WEATHER["function"]], max_tokens=300,
                                            function_call={"name": "get_weather"})
    assert legacy.choices[0].finish_reason == "function_call"
    assert legacy.choices[0].message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(legacy.choices[0].message.function_call.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_streamed_tool_calls_reassemble(client, tool_choice):
    calls: dict[int, dict] = {}
    reason = None
    for chunk in client.chat.completions.create(model="", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                                max_tokens=300, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            if part.id:
                assert call["id"] is None and part.function.name  # id, type and name come first, once
                call.update(id=part.id, name=part.function.name)
            call["arguments"] += part.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    assert reason == "tool_calls" and calls and sorted(calls) == list(range(len(calls)))
    params = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    for call in calls.values():
        assert call["id"] and call["name"] in params
        jsonschema.validate(json.loads(call["arguments"]), params[call["name"]])
    if isinstance(tool_choice, dict):
        assert [c["name"] for c in calls.values()] == ["get_weather"]


def test_streamed_legacy_function_call(client):
    """A call forced through the deprecated function_call streams delta.function_call: name, then arguments."""
    name, arguments, reason = None, "", None
    for chunk in client.chat.completions.create(model="", messages=ASK, functions=[WEATHER["function"]], max_tokens=300,
                                                function_call={"name": "get_weather"}, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            assert not delta.tool_calls and not delta.content
            if delta.function_call is not None:
                if delta.function_call.name:
                    assert name is None and not arguments
                    name = delta.function_call.name
                arguments += delta.function_call.arguments or ""
            reason = chunk.choices[0].finish_reason or reason
    assert (name, reason) == ("get_weather", "function_call")
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_tool_history_renders_into_the_prompt(client, demo_server):
    """An assistant message with tool_calls and the tool's result are accepted and change the prompt."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model="", messages=history, tools=[WEATHER], max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content is not None
    plain = client.chat.completions.create(model="", messages=ASK, max_tokens=20, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + len("18 degrees, sunny")


BAD = [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objx"}}}},
     "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "[a-z]+", "guided_choice": ["a"]}, "guided_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objx"}}}], "tool_choice": "required"},
     "tools"),
    ({"guided_json": {"type": "string", "minLength": 5, "maxLength": 2}}, "guided_json"),
    ({"guided_regex": "(?<=a)b"}, "guided_regex"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_values_are_400_naming_the_field(demo_server, extra, param):
    r = httpx.post(demo_server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": ASK, "max_tokens": 8, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and error["message"]


# ---------------------------------------------------------------------------------------------- LangChain

def test_langchain_structured_output(demo_server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str
        country: str = Field(pattern="^[A-Z]{2}$")

    class Trip(BaseModel):
        traveller: str
        days: int = Field(ge=1, le=30)
        cities: list[City] = Field(max_length=3)
        mode: str = Field(json_schema_extra={"enum": ["train", "plane"]})

    llm = ChatOpenAI(base_url=demo_server.url + "/v1", api_key="unused", model=demo_model_name(demo_server), max_tokens=400,
                     temperature=0.8, max_retries=0)
    trip = llm.with_structured_output(Trip).invoke("Plan a trip")
    assert isinstance(trip, Trip) and 1 <= trip.days <= 30 and trip.mode in ("train", "plane")


def test_langchain_tool_round_trip(demo_server):
    """bind_tools: the forced call comes back as AIMessage.tool_calls; its ToolMessage goes back in the
    history and the model answers in text."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(base_url=demo_server.url + "/v1", api_key="unused", model=demo_model_name(demo_server), max_tokens=200,
                     temperature=0.8, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    messages += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert isinstance(final.content, str) and not final.tool_calls


def demo_model_name(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_a_stop_string_that_cuts_a_forced_call_leaves_it_text(client):
    """A stop string inside the constrained reply ends it early: the reply is text, not a broken call."""
    r = client.chat.completions.create(model="", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=300,
                                       stop=['"arguments"'])
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content == '[{"name": "get_weather", '
