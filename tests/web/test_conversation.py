"""A chat as the page sees it: what is sent to the API, the exports, and reading an export back (import)."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from services.web.conversation import ChatImportError, Conversation, Message


def _chat() -> Conversation:
    return Conversation(
        [Message("user", "你好", created_at=datetime(2026, 1, 2, 3, 4, 5)),
         Message("assistant", "你好！有什么可以帮你？", model="telechat-demo", parameters={"top_k": 5},
                 finish_reason="stop", prompt_tokens=12, completion_tokens=9, first_token_s=0.1, elapsed_s=0.8),
         Message("user", "写一首诗"),
         Message("assistant", "床前明月光", status="cut", finish_reason="stopped")],
        id="c1", title="问候", system_prompt="你是助手", model="telechat-demo", parameters={"top_k": 5})


def test_api_messages_have_system_prompt_then_non_empty_turns() -> None:
    conv = _chat()
    conv.messages.append(Message("assistant", "", status="streaming"))
    assert conv.api_messages() == [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "写一首诗"},
        {"role": "assistant", "content": "床前明月光"},
    ]
    assert Conversation([Message("user", "hi")], system_prompt="  ").api_messages() == [
        {"role": "user", "content": "hi"}]


def test_view_helpers() -> None:
    conv = _chat()
    assert conv.last_user_text() == "写一首诗" and conv.can_regenerate and conv.streaming_reply is None
    assert conv.messages[-1].stopped and not conv.messages[1].stopped
    conv.messages.append(Message("user", "再来"))
    conv.messages.append(Message("assistant", "", status="streaming"))
    assert conv.streaming_reply is conv.messages[-1] and not conv.can_regenerate
    conv.messages[-1] = Message("assistant", "", status="cut", finish_reason="error", error={"key": "error_api"})
    assert conv.failed_reply is conv.messages[-1]
    assert Conversation().last_user_text() is None and not Conversation().can_regenerate


def test_json_export_holds_every_turn_and_is_resendable() -> None:
    doc = json.loads(_chat().to_json())
    assert (doc["title"], doc["model"], doc["parameters"]) == ("问候", "telechat-demo", {"top_k": 5})
    assert [m["role"] for m in doc["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert doc["messages"][1] == {"role": "user", "content": "你好", "created_at": "2026-01-02T03:04:05+00:00"}
    assert doc["messages"][2]["completion_tokens"] == 9 and doc["messages"][2]["finish_reason"] == "stop"
    assert "stopped" not in doc["messages"][2]
    assert doc["messages"][-1] == {"role": "assistant", "content": "床前明月光", "stopped": True,
                                   "finish_reason": "stopped"}
    assert "你好" in _chat().to_json()  # not \\u-escaped: readable Chinese


def test_json_export_reads_back_as_the_same_chat() -> None:
    exported = _chat().to_json()
    back = Conversation.from_json(exported)
    assert (back.title, back.system_prompt, back.model, back.parameters) == ("问候", "你是助手", "telechat-demo",
                                                                            {"top_k": 5})
    assert [(m.role, m.content, m.status, m.finish_reason) for m in back.messages] == [
        (m.role, m.content, m.status, m.finish_reason) for m in _chat().messages]
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "exported_at"}  # noqa: E731
    assert strip(back.to_json()) == strip(exported)


def test_a_plain_openai_message_list_imports_too() -> None:
    conv = Conversation.from_json(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}))
    assert [(m.role, m.content) for m in conv.messages] == [("user", "hi"), ("assistant", "hello")]
    assert conv.title == "" and conv.system_prompt == ""


@pytest.mark.parametrize("data, needle", [
    (b"\xff not json", "not JSON"),
    (b"[1, 2]", 'no "messages" list'),
    (json.dumps({"messages": []}), "no messages"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), "role 'tool'"),
    (json.dumps({"messages": [{"role": "user", "content": None}]}), "no text content"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}),
     "role 'system'"),
])
def test_a_bad_import_is_one_line(data, needle) -> None:
    with pytest.raises(ChatImportError) as info:
        Conversation.from_json(data)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_markdown_export_is_a_readable_transcript() -> None:
    md = _chat().to_markdown("zh")
    assert md.startswith("# 问候")
    assert md.index("## 系统") < md.index("## 用户") < md.index("## 助手")
    for msg in _chat().messages:
        assert msg.content in md
    assert "*(已停止生成)*" in md
    en = Conversation([Message("user", "hi"), Message("assistant", "hello")]).to_markdown("en")
    assert en.startswith("# TeleChat conversation") and "## User" in en and "## System" not in en
