"""Chat history: the turns shown on the page, what is sent to the API, and exports.

Pure data, no Streamlit: the page keeps one `Conversation` in its session state and mutates it
in place, so a reply written while streaming survives when the run is interrupted (Stop).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from services.web.i18n import Lang, t

Role = Literal["user", "assistant"]


@dataclass
class Message:
    """One turn. Assistant replies carry how they ended and their size."""

    role: Role
    content: str
    streaming: bool = False
    """Still being written. Left True only when the page run writing it was interrupted."""
    stopped: bool = False
    """Cut short (Stop, page interaction or an error mid-reply); the partial text is kept."""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    elapsed_s: float | None = None


@dataclass
class Conversation:
    """The turns of one chat, in order; user and assistant turns alternate loosely.

    A failed request leaves the user turn without an answer; `regenerate()` then retries it.
    """

    messages: list[Message] = field(default_factory=list)

    def add_user(self, text: str) -> None:
        """Append a user turn (an unanswered one before it stays, as the user saw it)."""
        self.messages.append(Message("user", text))

    def begin_reply(self) -> Message:
        """Append an empty assistant turn to stream into; the caller mutates it in place."""
        reply = Message("assistant", "", streaming=True)
        self.messages.append(reply)
        return reply

    def finish_interrupted(self) -> None:
        """Settle a reply whose writer was interrupted: keep the partial text, mark it stopped.

        A reply interrupted before its first token is dropped: there is nothing to keep.
        """
        for msg in list(self.messages):
            if msg.streaming:
                msg.streaming = False
                msg.stopped = True
                if not msg.content:
                    self.messages.remove(msg)

    @property
    def can_regenerate(self) -> bool:
        """A finished reply can be regenerated; an unanswered user turn can be retried."""
        return bool(self.messages) and not self.messages[-1].streaming

    def regenerate(self) -> None:
        """Drop the last reply (if any) so the last user turn is answered again."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()

    def last_user_text(self) -> str | None:
        """Text of the last user turn, the one that can be edited."""
        for msg in reversed(self.messages):
            if msg.role == "user":
                return msg.content
        return None

    def edit_last_user(self, text: str) -> None:
        """Replace the last user turn by `text`, dropping everything after it."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                del self.messages[i:]
                break
        self.add_user(text)

    def clear(self) -> None:
        self.messages.clear()

    def api_messages(self, system_prompt: str = "") -> list[dict[str, str]]:
        """OpenAI `messages` for the next request: system prompt, then every non-empty turn."""
        out = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        out += [{"role": m.role, "content": m.content} for m in self.messages if m.content]
        return out

    # ------------------------------------------------------------------------ export

    def to_json(self, *, model: str, system_prompt: str = "", params: dict[str, Any] | None = None) -> str:
        """A JSON document whose `messages` can be sent back to `/v1/chat/completions` as is.

        Replies cut short carry `"stopped": true` (an extra key OpenAI clients ignore).
        """
        messages = self.api_messages(system_prompt)
        turns = [m for m in self.messages if m.content]
        # api_messages() lists the system prompt first, then exactly these turns.
        for msg, out in zip(reversed(turns), reversed(messages)):
            if msg.stopped:
                out["stopped"] = True
        doc = {
            "model": model,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": params or {},
            "messages": messages,
        }
        return json.dumps(doc, ensure_ascii=False, indent=2)

    def to_markdown(self, lang: Lang, *, model: str, system_prompt: str = "") -> str:
        """A readable transcript; replies are already Markdown and are kept verbatim."""
        lines = [f"# {t('export_title', lang)}", "", f"*{t('model', lang)}: `{model}`*", ""]
        if system_prompt.strip():
            lines += [f"## {t('role_system', lang)}", "", system_prompt.strip(), ""]
        for msg in self.messages:
            if not msg.content:
                continue
            lines += [f"## {t('role_' + msg.role, lang)}", "", msg.content, ""]
            if msg.stopped:
                lines += [f"*({t('stopped', lang)})*", ""]
        return "\n".join(lines)
