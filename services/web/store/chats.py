"""Conversations and their messages, always seen through the user who owns them.

Every function taking ``user_id`` only reaches that user's rows: a conversation id from the URL that
belongs to someone else is not found, whatever the page shows or hides.

A reply is written while it streams. ``send`` / ``regenerate`` / ``edit_last`` store the user turn and
an empty assistant turn in state ``streaming`` in one transaction; the writer (``replies.py``) then
stores each piece with ``append_chunk``, one transaction per piece, so a killed process loses nothing
it had received. The reply is settled exactly once, by whoever comes first: ``finish_reply`` and
``fail_reply`` (the writer), ``stop_reply`` (Stop, from any tab, process or replica), ``interrupt_reply``
(shutdown) or the stale check in ``get_chat`` (a writer silent for longer than any live one can be).
Settling joins the chunks into the content in the same transaction. Later appends find the reply no
longer streaming and return False: that is how Stop reaches the writer, which then hangs up on the API.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.orm import Session

from services.web.conversation import COMPLETE, CUT, STREAMING, Conversation, Message
from services.web.errors import WebError
from services.web.store.database import Database
from services.web.store.models import Chat, MessageRow, ReplyChunk, utcnow

TITLE_CHARS = 40
MAX_TITLE_CHARS = 200
LIST_LIMIT = 200


class ChatNotFound(WebError):
    """No such conversation for this user (it may belong to someone else, or be deleted)."""


class ChatBusy(WebError):
    """A reply is being written in this conversation; it must end (or be stopped) first."""


@dataclass(frozen=True)
class ChatSummary:
    """A line of the conversation list."""

    id: str
    title: str
    updated_at: datetime


@dataclass(frozen=True)
class ReplySettings:
    """What a new reply is generated with (the sidebar's choices when it was asked for)."""

    model: str | None
    parameters: dict[str, Any]
    system_prompt: str = ""


@dataclass(frozen=True)
class StartedReply:
    """A reply stored as streaming, and the OpenAI messages to ask it with."""

    chat_id: str
    reply_id: int
    model: str | None
    messages: list[dict[str, str]]


def title_from(text: str) -> str:
    """An automatic title: the first line of the first message, spaces collapsed, cut at 40 characters."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"\s+", " ", line).strip()
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


# ---------------------------------------------------------------------------- reading


def list_chats(db: Database, user_id: int, query: str = "", limit: int = LIST_LIMIT) -> list[ChatSummary]:
    """The user's conversations, most recently active first; ``query`` keeps those whose title or any
    message contains it (case-insensitive for Latin letters; ``%`` and ``_`` are plain characters)."""
    stmt = select(Chat.id, Chat.title, Chat.updated_at).where(Chat.user_id == user_id)
    query = query.strip()
    if query:
        in_messages = exists().where(MessageRow.conversation_id == Chat.id,
                                     MessageRow.content.icontains(query, autoescape=True))
        stmt = stmt.where(or_(Chat.title.icontains(query, autoescape=True), in_messages))
    stmt = stmt.order_by(Chat.updated_at.desc(), Chat.id).limit(limit)
    with db.transaction() as s:
        return [ChatSummary(*row) for row in s.execute(stmt)]


def get_chat(db: Database, user_id: int, chat_id: str) -> Conversation | None:
    """The conversation with all its turns (a streaming reply with the text stored so far), or None when
    the user has no such conversation. A reply whose writer fell silent for too long is settled first."""
    with db.transaction() as s:
        chat = _owned(s, user_id, chat_id)
        if chat is None:
            return None
        _settle_stale(s, db.stale_reply_s, chat_id=chat_id)
        rows = s.scalars(select(MessageRow).where(MessageRow.conversation_id == chat_id).order_by(MessageRow.id))
        messages = [_message(s, row) for row in rows]
        return Conversation(messages, id=chat.id, title=chat.title, system_prompt=chat.system_prompt,
                            model=chat.model, parameters=chat.parameters or {})


def get_reply(db: Database, user_id: int, reply_id: int) -> Message | None:
    """One reply as stored right now (the live view polls this while it streams)."""
    with db.transaction() as s:
        row = _owned_message(s, user_id, reply_id)
        if row is None:
            return None
        if row.status == STREAMING and _settle_stale(s, db.stale_reply_s, message_id=reply_id):
            row = s.get(MessageRow, reply_id)
            if row is None:  # stale and empty: removed
                return None
        return _message(s, row)


# ---------------------------------------------------------------------------- turns


def send(db: Database, user_id: int, chat_id: str | None, text: str, reply: ReplySettings) -> StartedReply:
    """Add a user turn and start its reply; ``chat_id`` None starts a new conversation."""
    with db.transaction() as s:
        chat = _new_chat(s, user_id) if chat_id is None else _lock(s, user_id, chat_id)
        _check_idle(s, db, chat.id)
        _drop_failed_tail(s, chat.id)
        _add_user(s, chat, text)
        return _begin_reply(s, chat, reply)


def regenerate(db: Database, user_id: int, chat_id: str, reply: ReplySettings) -> StartedReply:
    """Drop the last reply (if any) and answer the last user turn again."""
    with db.transaction() as s:
        chat = _lock(s, user_id, chat_id)
        _check_idle(s, db, chat_id)
        last = s.scalar(select(MessageRow).where(MessageRow.conversation_id == chat_id).order_by(MessageRow.id.desc()))
        if last is None:
            raise WebError("nothing to answer: the conversation is empty")
        if last.role == "assistant":
            s.delete(last)
            s.flush()
        return _begin_reply(s, chat, reply)


def edit_last(db: Database, user_id: int, chat_id: str, text: str, reply: ReplySettings) -> StartedReply:
    """Replace the last user turn by ``text``, dropping what follows it, and answer it."""
    with db.transaction() as s:
        chat = _lock(s, user_id, chat_id)
        _check_idle(s, db, chat_id)
        last_user = s.scalar(select(MessageRow.id).where(MessageRow.conversation_id == chat_id,
                                                         MessageRow.role == "user").order_by(MessageRow.id.desc()))
        if last_user is not None:
            s.execute(delete(MessageRow).where(MessageRow.conversation_id == chat_id, MessageRow.id >= last_user))
        _add_user(s, chat, text)
        return _begin_reply(s, chat, reply)


def clear(db: Database, user_id: int, chat_id: str) -> None:
    """Remove every turn (a reply being written is stopped: its writer finds it gone)."""
    with db.transaction() as s:
        _lock(s, user_id, chat_id)
        s.execute(delete(MessageRow).where(MessageRow.conversation_id == chat_id))
        _touch(s, chat_id)


def rename(db: Database, user_id: int, chat_id: str, title: str) -> None:
    """Give the conversation a title of the user's own (it no longer follows the first message)."""
    title = re.sub(r"\s+", " ", title).strip()[:MAX_TITLE_CHARS]
    with db.transaction() as s:
        chat = _lock(s, user_id, chat_id)
        chat.title, chat.title_auto = title, not title


def delete_chat(db: Database, user_id: int, chat_id: str) -> None:
    """Delete the conversation and all its turns."""
    with db.transaction() as s:
        s.delete(_lock(s, user_id, chat_id))


def set_system_prompt(db: Database, user_id: int, chat_id: str, system_prompt: str) -> None:
    """The system prompt the conversation's next replies use."""
    with db.transaction() as s:
        _lock(s, user_id, chat_id).system_prompt = system_prompt


def import_chat(db: Database, user_id: int, conv: Conversation) -> str:
    """Store an imported conversation (``Conversation.from_json``) as a new one of the user; its id."""
    with db.transaction() as s:
        chat = _new_chat(s, user_id)
        chat.title = conv.title.strip()[:MAX_TITLE_CHARS]
        chat.title_auto = not chat.title
        chat.system_prompt, chat.model, chat.parameters = conv.system_prompt, conv.model, conv.parameters or None
        now = utcnow()
        for msg in conv.messages:
            if chat.title_auto and msg.role == "user" and not chat.title:
                chat.title = title_from(msg.content)
            s.add(MessageRow(
                conversation_id=chat.id, role=msg.role, content=msg.content,
                status=CUT if msg.stopped else COMPLETE, finish_reason=msg.finish_reason, model=msg.model,
                parameters=msg.parameters, prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens,
                first_token_s=msg.first_token_s, elapsed_s=msg.elapsed_s, created_at=msg.created_at or now,
                updated_at=now))
        return chat.id


# ---------------------------------------------------------------------------- the reply writer


def append_chunk(db: Database, reply_id: int, seq: int, text: str) -> bool:
    """Store piece ``seq`` of a streaming reply; False when the reply is no longer streaming (stopped,
    settled or deleted): the writer must stop. The update doubles as the writer's heartbeat."""
    with db.transaction() as s:
        if db.engine.dialect.name == "postgresql":
            # Losing the last few pieces on a PostgreSQL server crash is fine; waiting for its disk
            # on every piece is not. A killed web process still loses nothing.
            s.connection().exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
        alive = s.execute(update(MessageRow).where(MessageRow.id == reply_id, MessageRow.status == STREAMING)
                          .values(updated_at=utcnow()))
        if alive.rowcount != 1:
            return False
        s.add(ReplyChunk(message_id=reply_id, seq=seq, text=text))
        return True


def set_reply_model(db: Database, reply_id: int, model: str) -> None:
    """Record the model a reply is asked from, once known (the page may not have had the list yet)."""
    with db.transaction() as s:
        s.execute(update(MessageRow).where(MessageRow.id == reply_id).values(model=model))


def finish_reply(db: Database, reply_id: int, *, finish_reason: str | None, prompt_tokens: int | None = None,
                 completion_tokens: int | None = None, first_token_s: float | None = None,
                 elapsed_s: float | None = None) -> bool:
    """The API ended the reply: store it complete. False when it was settled before (e.g. stopped)."""
    with db.transaction() as s:
        return _settle(s, reply_id, COMPLETE, finish_reason, prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens, first_token_s=first_token_s, elapsed_s=elapsed_s)


def fail_reply(db: Database, reply_id: int, error: dict[str, Any], *, first_token_s: float | None = None,
               elapsed_s: float | None = None) -> bool:
    """The request failed: keep the text received so far, cut, with the error to show."""
    with db.transaction() as s:
        return _settle(s, reply_id, CUT, "error", error=error, first_token_s=first_token_s, elapsed_s=elapsed_s)


def stop_reply(db: Database, user_id: int, reply_id: int) -> bool:
    """Stop: the reply keeps what was stored so far, cut; its writer stops at its next piece."""
    with db.transaction() as s:
        row = _owned_message(s, user_id, reply_id)
        return row is not None and _settle(s, reply_id, CUT, "stopped", elapsed_s=_age(row, utcnow()))


def interrupt_reply(db: Database, reply_id: int) -> bool:
    """The web process is ending while writing this reply: keep it, cut."""
    with db.transaction() as s:
        row = s.get(MessageRow, reply_id)
        return row is not None and _settle(s, reply_id, CUT, "interrupted", elapsed_s=_age(row, utcnow()))


# ---------------------------------------------------------------------------- helpers


def _owned(s: Session, user_id: int, chat_id: str) -> Chat | None:
    return s.scalar(select(Chat).where(Chat.id == chat_id, Chat.user_id == user_id))


def _lock(s: Session, user_id: int, chat_id: str) -> Chat:
    """The user's conversation, locked for this transaction (PostgreSQL; SQLite's BEGIN IMMEDIATE already is)."""
    chat = s.scalar(select(Chat).where(Chat.id == chat_id, Chat.user_id == user_id).with_for_update())
    if chat is None:
        raise ChatNotFound("no such conversation")
    return chat


def _owned_message(s: Session, user_id: int, message_id: int) -> MessageRow | None:
    return s.scalar(select(MessageRow).join(Chat, Chat.id == MessageRow.conversation_id)
                    .where(MessageRow.id == message_id, Chat.user_id == user_id))


def _new_chat(s: Session, user_id: int) -> Chat:
    now = utcnow()
    chat = Chat(id=uuid.uuid4().hex, user_id=user_id, title="", title_auto=True, system_prompt="",
                created_at=now, updated_at=now)
    s.add(chat)
    s.flush()
    return chat


def _check_idle(s: Session, db: Database, chat_id: str) -> None:
    _settle_stale(s, db.stale_reply_s, chat_id=chat_id)
    if s.scalar(select(MessageRow.id).where(MessageRow.conversation_id == chat_id, MessageRow.status == STREAMING)):
        raise ChatBusy("a reply is still being written in this conversation")


def _drop_failed_tail(s: Session, chat_id: str) -> None:
    """A failed reply with no text only carried its error: the next turn replaces it."""
    s.execute(delete(MessageRow).where(MessageRow.conversation_id == chat_id, MessageRow.role == "assistant",
                                       MessageRow.status == CUT, MessageRow.content == ""))


def _add_user(s: Session, chat: Chat, text: str) -> None:
    first = not s.scalar(select(MessageRow.id).where(MessageRow.conversation_id == chat.id).limit(1))
    if chat.title_auto and first:
        chat.title = title_from(text)
    s.add(MessageRow(conversation_id=chat.id, role="user", content=text, status=COMPLETE))


def _begin_reply(s: Session, chat: Chat, reply: ReplySettings) -> StartedReply:
    chat.system_prompt, chat.model, chat.parameters = reply.system_prompt, reply.model or chat.model, reply.parameters
    chat.updated_at = utcnow()
    s.flush()
    turns = s.scalars(select(MessageRow).where(MessageRow.conversation_id == chat.id).order_by(MessageRow.id)).all()
    messages = Conversation([Message(m.role, m.content) for m in turns],  # type: ignore[arg-type]
                            system_prompt=reply.system_prompt).api_messages()
    row = MessageRow(conversation_id=chat.id, role="assistant", content="", status=STREAMING, model=reply.model,
                     parameters=reply.parameters)
    s.add(row)
    s.flush()
    return StartedReply(chat.id, row.id, reply.model, messages)


def _touch(s: Session, chat_id: str) -> None:
    s.execute(update(Chat).where(Chat.id == chat_id).values(updated_at=utcnow()))


def _chunks(s: Session, message_id: int) -> str:
    return "".join(s.scalars(select(ReplyChunk.text).where(ReplyChunk.message_id == message_id)
                             .order_by(ReplyChunk.seq)))


def _age(row: MessageRow, until: datetime | None = None) -> float:
    """Seconds from the reply's start to ``until`` (default: its last piece)."""
    return ((until or row.updated_at) - row.created_at).total_seconds()


def _settle(s: Session, reply_id: int, status: str, finish_reason: str | None, **fields: Any) -> bool:
    """Settle a streaming reply once: the status update is the guard (a second settler updates nothing).
    A reply cut before its first piece and without an error is removed: there is nothing to keep."""
    now = utcnow()
    done = s.execute(update(MessageRow).where(MessageRow.id == reply_id, MessageRow.status == STREAMING)
                     .values(status=status, finish_reason=finish_reason, updated_at=now, **fields))
    if done.rowcount != 1:
        return False
    content = _chunks(s, reply_id)
    s.execute(delete(ReplyChunk).where(ReplyChunk.message_id == reply_id))
    row = s.get(MessageRow, reply_id)
    assert row is not None
    if not content and status == CUT and fields.get("error") is None:
        s.delete(row)
    else:
        row.content = content
    _touch(s, row.conversation_id)
    s.flush()
    return True


def _settle_stale(s: Session, stale_s: float, *, chat_id: str | None = None, message_id: int | None = None) -> int:
    """Settle streaming replies whose writer has been silent for ``stale_s`` (its process is gone)."""
    stmt = select(MessageRow.id).where(MessageRow.status == STREAMING,
                                       MessageRow.updated_at < utcnow() - timedelta(seconds=stale_s))
    if chat_id is not None:
        stmt = stmt.where(MessageRow.conversation_id == chat_id)
    if message_id is not None:
        stmt = stmt.where(MessageRow.id == message_id)
    settled = 0
    for reply_id in s.scalars(stmt).all():
        row = s.get(MessageRow, reply_id)
        settled += _settle(s, reply_id, CUT, "interrupted", elapsed_s=_age(row) if row else None)
    return settled


def _message(s: Session, row: MessageRow) -> Message:
    content = _chunks(s, row.id) if row.status == STREAMING else row.content
    return Message(row.role, content, id=row.id, status=row.status,  # type: ignore[arg-type]
                   finish_reason=row.finish_reason, model=row.model, parameters=row.parameters,
                   prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                   first_token_s=row.first_token_s, elapsed_s=row.elapsed_s, created_at=row.created_at,
                   error=row.error)
