"""Tool calls and tool results in a TeleChat v1 conversation (docs/chat-format.md, "Tools").

The v1 format has user and assistant turns only. OpenAI histories also hold assistant messages
with ``tool_calls`` and ``tool`` messages with their results; :func:`flatten_tool_messages` turns
them into plain turns with clearly delimited text, so :class:`~telechat.chat_format.ChatFormat`
encodes them like any other turn:

* an assistant message's calls: its content (if any), then one line per call,
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* tool results: a user turn, one ``<tool_response>...</tool_response>`` line per result (results in
  a row share one turn; a user message right after them joins it, after a blank line).

The tags are plain text (no vocabulary entries), so the tokenizer reads them as any other characters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"


def call_text(name: str, arguments: str) -> str:
    """One call as a line of text; ``arguments`` (JSON text) is inserted as written."""
    args = arguments.strip() or "{}"
    return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}{TOOL_CALL_CLOSE}'


def tools_text(functions: Sequence[Mapping[str, Any]]) -> str:
    """The functions a reply must call, as a block for the system prompt (used when a call is forced)."""
    lines = [json.dumps(dict(f), ensure_ascii=False) for f in functions]
    return "\n".join(["You call functions. Available functions:", TOOLS_OPEN, *lines, TOOLS_CLOSE])


def _calls(message: Mapping[str, Any]) -> list[tuple[str, str]]:
    calls = [(c["function"]["name"], c["function"].get("arguments") or "") for c in message.get("tool_calls") or []]
    if message.get("function_call"):
        fc = message["function_call"]
        calls.append((fc["name"], fc.get("arguments") or ""))
    return calls


def flatten_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``{"role", "content"}`` messages with tool calls and results rendered as text (module doc).
    Messages without tools pass through unchanged (``role`` and ``content`` only)."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role in ("tool", "function"):
            text = f"{TOOL_RESPONSE_OPEN}{content}{TOOL_RESPONSE_CLOSE}"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool": "1"})
            continue
        if role == "user" and out and out[-1].get("_tool"):
            out[-1]["content"] += "\n\n" + content
            out[-1].pop("_tool")
            continue
        calls = _calls(m) if role in ("assistant", "bot") else []
        if calls:
            content = "\n".join(([content] if content else []) + [call_text(n, a) for n, a in calls])
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    return out


def with_tools(messages: list[dict[str, str]], functions: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``messages`` whose system prompt ends with :func:`tools_text` (one is added when there is none):
    a reply forced to call one of ``functions`` is written knowing what they are for."""
    block = tools_text(functions)
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        return [{"role": "system", "content": f"{first}\n\n{block}" if first else block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]
