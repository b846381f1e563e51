"""Chat history: what is sent, regenerate, edit-last, interrupted replies, exports."""

from __future__ import annotations

import json

from services.web.conversation import Conversation


def _chat() -> Conversation:
    conv = Conversation()
    conv.add_user("你好")
    conv.begin_reply().content = "你好！有什么可以帮你？"
    conv.messages[-1].streaming = False
    conv.add_user("写一首诗")
    reply = conv.begin_reply()
    reply.content = "床前明月光"
    reply.streaming = False
    return conv


def test_api_messages_have_system_prompt_then_turns() -> None:
    conv = _chat()
    assert conv.api_messages("你是助手") == [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "写一首诗"},
        {"role": "assistant", "content": "床前明月光"},
    ]
    assert conv.api_messages("  ")[0]["role"] == "user"


def test_empty_streaming_reply_is_not_sent() -> None:
    conv = Conversation()
    conv.add_user("hi")
    conv.begin_reply()
    assert conv.api_messages() == [{"role": "user", "content": "hi"}]


def test_regenerate_drops_only_the_last_reply() -> None:
    conv = _chat()
    conv.regenerate()
    assert [m.content for m in conv.messages] == ["你好", "你好！有什么可以帮你？", "写一首诗"]
    conv.regenerate()  # an unanswered user turn stays: it is what gets answered again
    assert conv.messages[-1].content == "写一首诗"
    assert conv.can_regenerate


def test_edit_last_user_truncates_after_it() -> None:
    conv = _chat()
    assert conv.last_user_text() == "写一首诗"
    conv.edit_last_user("写一首词")
    assert [m.content for m in conv.messages] == ["你好", "你好！有什么可以帮你？", "写一首词"]
    assert Conversation().last_user_text() is None


def test_interrupted_reply_keeps_partial_text_marked_stopped() -> None:
    conv = Conversation()
    conv.add_user("写一段很长的文字")
    reply = conv.begin_reply()
    assert not conv.can_regenerate  # nothing to regenerate while a reply is being written
    reply.content = "从前有一座山"
    conv.finish_interrupted()
    assert reply.stopped and not reply.streaming and conv.messages[-1] is reply
    assert conv.can_regenerate


def test_interrupted_reply_without_text_is_dropped() -> None:
    conv = Conversation()
    conv.add_user("hi")
    conv.begin_reply()
    conv.finish_interrupted()
    assert [m.role for m in conv.messages] == ["user"]


def test_json_export_holds_every_turn_and_is_resendable() -> None:
    conv = _chat()
    conv.messages[-1].stopped = True
    doc = json.loads(conv.to_json(model="telechat-demo", system_prompt="sys", params={"top_k": 5}))
    assert doc["model"] == "telechat-demo" and doc["parameters"] == {"top_k": 5}
    assert [m["role"] for m in doc["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert doc["messages"][1]["content"] == "你好"
    assert doc["messages"][-1] == {"role": "assistant", "content": "床前明月光", "stopped": True}
    assert "stopped" not in doc["messages"][2]
    assert "你好" in conv.to_json(model="m")  # not \\u-escaped: readable Chinese


def test_markdown_export_is_a_readable_transcript() -> None:
    conv = _chat()
    conv.messages[-1].stopped = True
    md = conv.to_markdown("zh", model="telechat-demo", system_prompt="你是助手")
    assert md.startswith("# TeleChat 对话记录")
    assert md.index("## 系统") < md.index("## 用户") < md.index("## 助手")
    for msg in conv.messages:
        assert msg.content in md
    assert "*(已停止生成)*" in md
    en = conv.to_markdown("en", model="m")
    assert "## User" in en and "## Assistant" in en and "## System" not in en


def test_clear_empties_history() -> None:
    conv = _chat()
    conv.clear()
    assert conv.messages == [] and not conv.can_regenerate
