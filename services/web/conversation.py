"""A chat as the page sees it: its turns, what is sent to the API, and the JSON / Markdown exports.

Pure data, no Streamlit and no database: ``services.web.store.chats`` reads and writes these, the page
draws them. The JSON export is also the import format (``from_json``), so a chat round-trips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from services.web.i18n import Lang, t

Role = Literal["user", "assistant"]
Status = Literal["complete", "streaming", "cut"]

COMPLETE: Status = "complete"
STREAMING: Status = "streaming"
CUT: Status = "cut"
"""A reply cut short; its ``finish_reason`` says why: ``stopped`` (the user), ``error`` (the API failed
mid-reply or before it) or ``interrupted`` (the web process ended while writing it)."""

MAX_IMPORT_BYTES = 20 * 1024 * 1024
_RECORD_KEYS = ("model", "parameters", "finish_reason", "prompt_tokens", "completion_tokens", "first_token_s",
                "elapsed_s", "created_at")
"""Per-message fields the export carries besides role and content (keys OpenAI clients ignore)."""


class ChatImportError(ValueError):
    """The file is not a chat export; the message is one line saying why."""


@dataclass
class Message:
    """One turn as stored. Replies carry how they were made and how they ended."""

    role: Role
    content: str
    id: int | None = None
    status: Status = COMPLETE
    finish_reason: str | None = None
    model: str | None = None
    parameters: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    elapsed_s: float | None = None
    created_at: datetime | None = None
    error: dict[str, Any] | None = None
    """The failure of a reply that ended with ``finish_reason == "error"`` (``client.error_record``)."""

    @property
    def streaming(self) -> bool:
        return self.status == STREAMING

    @property
    def stopped(self) -> bool:
        """Cut short (Stop, an error mid-reply, the web process ending); the partial text is kept."""
        return self.status == CUT


@dataclass
class Conversation:
    """The turns of one chat, oldest first, with the settings its replies were made with."""

    messages: list[Message] = field(default_factory=list)
    id: str | None = None
    title: str = ""
    system_prompt: str = ""
    model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def streaming_reply(self) -> Message | None:
        """The reply being written right now, if any (always the last turn)."""
        return next((m for m in self.messages if m.streaming), None)

    @property
    def failed_reply(self) -> Message | None:
        """The last turn when it is a reply that failed with no text (it is shown as an error, not a bubble)."""
        last = self.messages[-1] if self.messages else None
        return last if last is not None and last.error is not None and not last.content else None

    @property
    def can_regenerate(self) -> bool:
        """A finished reply can be regenerated; an unanswered user turn can be retried."""
        return bool(self.messages) and self.streaming_reply is None

    def last_user_text(self) -> str | None:
        """Text of the last user turn, the one that can be edited."""
        for msg in reversed(self.messages):
            if msg.role == "user":
                return msg.content
        return None

    def api_messages(self) -> list[dict[str, str]]:
        """OpenAI `messages` for the next request: system prompt, then every non-empty turn."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        out += [{"role": m.role, "content": m.content} for m in self.messages if m.content]
        return out

    # ------------------------------------------------------------------------ export

    def to_json(self) -> str:
        """A JSON document whose `messages` can be sent back to `/v1/chat/completions` as is.

        Each turn also carries how it was made (model, parameters, token counts, timing, finish reason)
        under keys OpenAI clients ignore; replies cut short carry `"stopped": true`. `from_json` reads it back.
        """
        messages: list[dict[str, Any]] = []
        if self.system_prompt.strip():
            messages.append({"role": "system", "content": self.system_prompt})
        for msg in self.messages:
            if not msg.content:
                continue
            out: dict[str, Any] = {"role": msg.role, "content": msg.content}
            if msg.stopped:
                out["stopped"] = True
            for key in _RECORD_KEYS:
                value = getattr(msg, key)
                if value is not None:
                    out[key] = _utc_text(value) if isinstance(value, datetime) else value
            messages.append(out)
        doc = {
            "title": self.title,
            "model": self.model or "",
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": self.parameters or {},
            "messages": messages,
        }
        return json.dumps(doc, ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, data: bytes | str) -> Conversation:
        """Read a `to_json` export (or any OpenAI-style `{"messages": [...]}`); raises ChatImportError."""
        if len(data) > MAX_IMPORT_BYTES:
            raise ChatImportError(f"the file is larger than {MAX_IMPORT_BYTES // 2**20} MB")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ChatImportError(f"not JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
            raise ChatImportError('no "messages" list: not a TeleChat chat export')
        conv = cls(title=_text(doc.get("title")), model=_text(doc.get("model")) or None,
                   parameters=doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {})
        for i, raw in enumerate(doc["messages"]):
            if not isinstance(raw, dict) or not isinstance(raw.get("content"), str):
                raise ChatImportError(f"message {i + 1} has no text content")
            role = raw.get("role")
            if role == "system" and i == 0:
                conv.system_prompt = raw["content"]
                continue
            if role not in ("user", "assistant"):
                raise ChatImportError(f"message {i + 1} has role {role!r}; expected user or assistant")
            conv.messages.append(_message_from(role, raw))
        if not conv.messages:
            raise ChatImportError("the chat has no messages")
        return conv

    def to_markdown(self, lang: Lang) -> str:
        """A readable transcript; replies are already Markdown and are kept verbatim."""
        lines = [f"# {self.title or t('export_title', lang)}", "", f"*{t('model', lang)}: `{self.model or ''}`*", ""]
        if self.system_prompt.strip():
            lines += [f"## {t('role_system', lang)}", "", self.system_prompt.strip(), ""]
        for msg in self.messages:
            if not msg.content:
                continue
            lines += [f"## {t('role_' + msg.role, lang)}", "", msg.content, ""]
            if msg.stopped:
                lines += [f"*({t('stopped', lang)})*", ""]
        return "\n".join(lines)


def _utc_text(value: datetime) -> str:
    """A stored (naive UTC) time as ISO 8601 with its offset."""
    return value.replace(tzinfo=timezone.utc).isoformat(timespec="seconds")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _message_from(role: Role, raw: dict[str, Any]) -> Message:
    """One imported turn; record fields of the wrong type are dropped rather than refused."""
    msg = Message(role, raw["content"], status=CUT if raw.get("stopped") is True else COMPLETE)
    for key, kind in (("model", str), ("parameters", dict), ("finish_reason", str), ("prompt_tokens", int),
                      ("completion_tokens", int), ("first_token_s", (int, float)), ("elapsed_s", (int, float))):
        value = raw.get(key)
        if isinstance(value, kind) and not isinstance(value, bool):
            setattr(msg, key, value)
    if isinstance(raw.get("created_at"), str):
        try:
            created = datetime.fromisoformat(raw["created_at"])
            msg.created_at = created.astimezone(timezone.utc).replace(tzinfo=None) if created.tzinfo else created
        except ValueError:
            pass
    if msg.stopped and msg.finish_reason is None:
        msg.finish_reason = "stopped"
    return msg
