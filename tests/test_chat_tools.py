"""Tool calls and results rendered into TeleChat v1 turns (telechat/chat_tools.py, docs/chat-format.md)."""

from __future__ import annotations

import json

from telechat.chat_format import validate_messages
from telechat.chat_tools import flatten_tool_messages, with_tools


def call(name: str, arguments: dict) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def test_calls_and_results_become_alternating_turns():
    history = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"}),
                                                               call("get_time", {"zone": "UTC+1"})]},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_get_time", "content": "12:00"},
        {"role": "assistant", "content": "18C at noon."},
        {"role": "user", "content": "thanks"},
    ]
    flat = flatten_tool_messages(history)
    validate_messages(flat)  # the v1 alternation holds
    assert flat[2] == {"role": "assistant", "content":
                       '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
                       '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC+1"}}</tool_call>'}
    assert flat[3] == {"role": "user", "content": "<tool_response>18C</tool_response>\n<tool_response>12:00</tool_response>"}
    assert flat[4:] == [{"role": "assistant", "content": "18C at noon."}, {"role": "user", "content": "thanks"}]


def test_a_user_message_after_results_joins_their_turn_and_plain_chats_pass_through():
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "let me look",
                                                  "function_call": {"name": "f", "arguments": ""}},
               {"role": "tool", "content": "r"}, {"role": "user", "content": "and?"}]
    flat = flatten_tool_messages(history)
    validate_messages(flat)
    assert flat[1]["content"] == 'let me look\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert flat[2] == {"role": "user", "content": "<tool_response>r</tool_response>\n\nand?"}
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert flatten_tool_messages(plain) == plain


def test_forced_calls_list_the_functions_in_the_system_prompt():
    f = {"name": "get_weather", "parameters": {"type": "object"}}
    with_system = with_tools([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], [f])
    assert with_system[0]["content"].startswith("S\n\n") and json.dumps(f) in with_system[0]["content"]
    added = with_tools([{"role": "user", "content": "q"}], [f])
    assert added[0]["role"] == "system" and added[1:] == [{"role": "user", "content": "q"}]
