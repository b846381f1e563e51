"""Storage of chats and users (services/web/store), on SQLite and on PostgreSQL: the same tests on both.

No browser and no API: the functions the page and the reply writer call, on a real database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from services.web.conversation import Conversation
from services.web.errors import WebError
from services.web.store import chats, users
from services.web.store.database import VERSION_TABLE, Database, migrate, open_database, schema_version
from services.web.store.models import Base, LoginSession, MessageRow, ReplyChunk, User
from tests.conftest import REPO

REPLY = chats.ReplySettings("telechat-demo", {"temperature": 0.0, "max_tokens": 64}, "你是助手")


@pytest.fixture
def db(database_url) -> Database:
    database = open_database(make_url(database_url))
    yield database
    database.close()


@pytest.fixture
def alice(db) -> users.UserInfo:
    return users.add_user(db, "alice", "alice-password")


def _answered(db: Database, user_id: int, chat_id: str | None, text: str, reply: str) -> chats.StartedReply:
    """A user turn and its reply, written the way the reply writer does."""
    started = chats.send(db, user_id, chat_id, text, REPLY)
    assert chats.append_chunk(db, started.reply_id, 0, reply)
    assert chats.finish_reply(db, started.reply_id, finish_reason="stop", prompt_tokens=9, completion_tokens=3,
                              first_token_s=0.1, elapsed_s=0.5)
    return started


def _count(db: Database, table) -> int:
    with db.transaction() as s:
        return s.scalar(select(func.count()).select_from(table))


# ---------------------------------------------------------------------------- schema


def test_migrations_build_the_models_schema_and_rerun_as_no_op(db):
    """Alembic's head is applied, the migrated tables are exactly the models, and migrating again changes nothing."""
    current, head = schema_version(db.engine)
    assert current == head == "0001"
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(context, Base.metadata) == []
    migrate(db.engine)
    assert schema_version(db.engine) == (head, head)


def test_a_bad_database_url_is_one_clear_line(tmp_path):
    from services.web.store.database import StorageError, database_url

    with pytest.raises(StorageError, match="mysql is not supported"):
        database_url("mysql://u:p@h/db", tmp_path)
    with pytest.raises(StorageError) as info:
        open_database(database_url("postgresql://u:secret-pw@127.0.0.1:1/db", tmp_path))
    assert "secret-pw" not in str(info.value) and "\n" not in str(info.value)
    assert database_url("postgres://u@h/db", tmp_path).drivername == "postgresql+psycopg"


# ---------------------------------------------------------------------------- conversations


def test_chats_are_listed_newest_first_titled_and_searched(db, alice):
    first = _answered(db, alice.id, None, "  Hello   World\nsecond line", "hi")
    poem = "写一首关于长江的诗，要求七言绝句，押韵，并且逐句解释每一句诗的意思和其中用到的典故与修辞手法"
    assert len(poem) > chats.TITLE_CHARS
    second = _answered(db, alice.id, None, poem, "江水东流")
    third = _answered(db, alice.id, None, "100% sure_thing", "ok")
    _answered(db, alice.id, first.chat_id, "again", "yes")  # activity moves it to the top
    listed = chats.list_chats(db, alice.id)
    assert [c.id for c in listed] == [first.chat_id, third.chat_id, second.chat_id]
    assert listed[0].title == "Hello World"
    assert listed[2].title == poem[:chats.TITLE_CHARS - 1] + "…"
    assert [c.id for c in chats.list_chats(db, alice.id, "hello")] == [first.chat_id]  # title, any case
    assert [c.id for c in chats.list_chats(db, alice.id, "江水")] == [second.chat_id]  # a reply's text
    assert [c.id for c in chats.list_chats(db, alice.id, "%")] == [third.chat_id]  # % is a character
    assert [c.id for c in chats.list_chats(db, alice.id, "sur_")] == []  # so is _ (else it matches "sure")
    assert chats.list_chats(db, alice.id, "no such text") == []


def test_rename_delete_and_clear(db, alice):
    started = _answered(db, alice.id, None, "first question", "answer")
    chats.rename(db, alice.id, started.chat_id, "  My   chat ")
    assert chats.get_chat(db, alice.id, started.chat_id).title == "My chat"
    chats.edit_last(db, alice.id, started.chat_id, "edited question", REPLY)
    assert chats.get_chat(db, alice.id, started.chat_id).title == "My chat", "a renamed chat keeps its title"
    chats.clear(db, alice.id, started.chat_id)
    assert chats.get_chat(db, alice.id, started.chat_id).messages == []
    _answered(db, alice.id, started.chat_id, "more", "text")
    chats.delete_chat(db, alice.id, started.chat_id)
    assert chats.get_chat(db, alice.id, started.chat_id) is None
    assert chats.list_chats(db, alice.id) == []
    assert _count(db, MessageRow) == 0, "a deleted chat leaves no messages behind"


def test_regenerate_and_edit_answer_the_last_user_turn_again(db, alice):
    started = _answered(db, alice.id, None, "question one", "answer one")
    again = chats.regenerate(db, alice.id, started.chat_id, REPLY)
    assert again.messages[-1] == {"role": "user", "content": "question one"}
    assert again.messages[0] == {"role": "system", "content": "你是助手"}
    with pytest.raises(chats.ChatBusy):
        chats.send(db, alice.id, started.chat_id, "while streaming", REPLY)
    chats.stop_reply(db, alice.id, again.reply_id)  # nothing arrived: the empty reply goes
    edited = chats.edit_last(db, alice.id, started.chat_id, "question two", REPLY)
    conv = chats.get_chat(db, alice.id, started.chat_id)
    assert [(m.role, m.content) for m in conv.messages] == [("user", "question two"), ("assistant", "")]
    assert conv.title == "question two", "an automatic title follows the first message"
    assert edited.messages == [{"role": "system", "content": "你是助手"},
                               {"role": "user", "content": "question two"}]


def test_users_never_reach_each_others_chats(db, alice):
    """Every read and write is checked against the owner: a forged id finds nothing and changes nothing."""
    bob = users.add_user(db, "bob", "bob-password")
    started = _answered(db, alice.id, None, "alice's secret", "reply")
    live = chats.send(db, alice.id, started.chat_id, "still going", REPLY)
    assert chats.list_chats(db, bob.id) == [] and chats.list_chats(db, bob.id, "secret") == []
    assert chats.get_chat(db, bob.id, started.chat_id) is None
    assert chats.get_reply(db, bob.id, live.reply_id) is None
    assert chats.stop_reply(db, bob.id, live.reply_id) is False
    for action in (lambda: chats.rename(db, bob.id, started.chat_id, "mine"),
                   lambda: chats.delete_chat(db, bob.id, started.chat_id),
                   lambda: chats.clear(db, bob.id, started.chat_id),
                   lambda: chats.send(db, bob.id, started.chat_id, "hi", REPLY),
                   lambda: chats.regenerate(db, bob.id, started.chat_id, REPLY),
                   lambda: chats.set_system_prompt(db, bob.id, started.chat_id, "x")):
        with pytest.raises(chats.ChatNotFound):
            action()
    conv = chats.get_chat(db, alice.id, started.chat_id)
    assert conv.title == "alice's secret" and len(conv.messages) == 4 and conv.streaming_reply is not None


# ---------------------------------------------------------------------------- replies


def test_a_reply_is_stored_piece_by_piece_and_settled_once(db, alice):
    started = chats.send(db, alice.id, None, "你好", REPLY)
    for seq, piece in enumerate(["你好", "！我是", "演示模型。"]):
        assert chats.append_chunk(db, started.reply_id, seq, piece)
        assert chats.get_reply(db, alice.id, started.reply_id).content == "你好！我是演示模型。"[:sum(
            len(p) for p in ["你好", "！我是", "演示模型。"][:seq + 1])]
    assert chats.finish_reply(db, started.reply_id, finish_reason="stop", prompt_tokens=12, completion_tokens=7,
                              first_token_s=0.2, elapsed_s=1.5)
    reply = chats.get_chat(db, alice.id, started.chat_id).messages[-1]
    assert (reply.content, reply.status, reply.finish_reason) == ("你好！我是演示模型。", "complete", "stop")
    assert (reply.prompt_tokens, reply.completion_tokens, reply.first_token_s, reply.elapsed_s) == (12, 7, 0.2, 1.5)
    assert (reply.model, reply.parameters) == ("telechat-demo", REPLY.parameters)
    assert not chats.append_chunk(db, started.reply_id, 3, "late"), "a settled reply takes no more pieces"
    assert not chats.stop_reply(db, alice.id, started.reply_id)
    assert chats.get_reply(db, alice.id, started.reply_id).content == "你好！我是演示模型。"
    assert _count(db, ReplyChunk) == 0


def test_a_piece_is_never_stored_twice(db, alice):
    from sqlalchemy.exc import IntegrityError

    started = chats.send(db, alice.id, None, "hi", REPLY)
    assert chats.append_chunk(db, started.reply_id, 0, "a")
    with pytest.raises(IntegrityError):
        chats.append_chunk(db, started.reply_id, 0, "a")
    assert chats.get_reply(db, alice.id, started.reply_id).content == "a"


def test_stop_keeps_the_partial_reply_marked_stopped(db, alice):
    started = chats.send(db, alice.id, None, "Keep writing forever", REPLY)
    assert chats.append_chunk(db, started.reply_id, 0, "Once upon ")
    assert chats.append_chunk(db, started.reply_id, 1, "a time")
    assert chats.stop_reply(db, alice.id, started.reply_id)
    assert not chats.append_chunk(db, started.reply_id, 2, " there"), "the writer learns it was stopped"
    assert not chats.finish_reply(db, started.reply_id, finish_reason="length")
    reply = chats.get_chat(db, alice.id, started.chat_id).messages[-1]
    assert (reply.content, reply.status, reply.finish_reason) == ("Once upon a time", "cut", "stopped")
    assert reply.stopped and reply.elapsed_s is not None


def test_a_failed_reply_keeps_its_text_and_error(db, alice):
    error = {"key": "error_unavailable", "message": "Cannot connect to the API.", "status": None, "detail": None}
    started = chats.send(db, alice.id, None, "first", REPLY)
    assert chats.append_chunk(db, started.reply_id, 0, "partial")
    assert chats.fail_reply(db, started.reply_id, error, elapsed_s=0.3)
    conv = chats.get_chat(db, alice.id, started.chat_id)
    assert (conv.messages[-1].content, conv.messages[-1].finish_reason, conv.messages[-1].error) == (
        "partial", "error", error)
    nothing = chats.send(db, alice.id, started.chat_id, "second", REPLY)
    assert chats.fail_reply(db, nothing.reply_id, error)
    assert chats.get_chat(db, alice.id, started.chat_id).failed_reply is not None
    chats.send(db, alice.id, started.chat_id, "third", REPLY)  # the empty failed reply made way for it
    roles = [(m.role, m.content) for m in chats.get_chat(db, alice.id, started.chat_id).messages]
    assert roles == [("user", "first"), ("assistant", "partial"), ("user", "second"), ("user", "third"),
                     ("assistant", "")]


_KILLED_WRITER = """
import os, signal, sys
from sqlalchemy.engine import make_url
from services.web.store import chats, users
from services.web.store.database import open_database
db = open_database(make_url(sys.argv[1]))
user = users.add_user(db, "carol", "carol-password")
started = chats.send(db, user.id, None, "Keep writing forever", chats.ReplySettings(None, {}, ""))
print(started.chat_id, started.reply_id, flush=True)
for seq, piece in enumerate(["Once ", "upon ", "a ", "time"]):
    assert chats.append_chunk(db, started.reply_id, seq, piece)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_loses_nothing_it_stored(database_url):
    """A web process killed mid-reply: the pieces it committed are kept, and once its silence outlasts any
    live writer's the reply is settled as interrupted, with all of them."""
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, database_url], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    chat_id, reply_id = done.stdout.split()
    patient = open_database(make_url(database_url), stale_reply_s=3600)
    carol = users.check_password(patient, "carol", "carol-password")
    live = chats.get_reply(patient, carol.id, int(reply_id))
    assert (live.content, live.status) == ("Once upon a time", "streaming"), "still within the writer's silence"
    patient.close()
    impatient = open_database(make_url(database_url), stale_reply_s=0)
    reply = chats.get_chat(impatient, carol.id, chat_id).messages[-1]
    assert (reply.content, reply.status, reply.finish_reason) == ("Once upon a time", "cut", "interrupted")
    assert _count(impatient, ReplyChunk) == 0
    impatient.close()


def test_interrupt_at_shutdown_keeps_the_reply(db, alice):
    started = chats.send(db, alice.id, None, "hi", REPLY)
    assert chats.append_chunk(db, started.reply_id, 0, "so far")
    assert chats.interrupt_reply(db, started.reply_id)
    reply = chats.get_chat(db, alice.id, started.chat_id).messages[-1]
    assert (reply.content, reply.finish_reason) == ("so far", "interrupted")


def test_export_then_import_gives_the_same_chat(db, alice):
    started = _answered(db, alice.id, None, "你好", "你好！**粗体** 与 `code`")
    cut = chats.send(db, alice.id, started.chat_id, "Keep writing forever", REPLY)
    chats.append_chunk(db, cut.reply_id, 0, "Once upon a time")
    chats.stop_reply(db, alice.id, cut.reply_id)
    chats.rename(db, alice.id, started.chat_id, "导出测试")
    exported = chats.get_chat(db, alice.id, started.chat_id).to_json()
    copy_id = chats.import_chat(db, alice.id, Conversation.from_json(exported))
    assert copy_id != started.chat_id
    again = chats.get_chat(db, alice.id, copy_id).to_json()
    strip = lambda doc: {k: v for k, v in json.loads(doc).items() if k != "exported_at"}  # noqa: E731
    assert strip(again) == strip(exported)
    assert json.loads(exported)["messages"][-1]["stopped"] is True


# ---------------------------------------------------------------------------- users


def test_passwords_are_salted_argon2_and_checked(db):
    alice = users.add_user(db, "alice", "same-password")
    users.add_user(db, "bob", "same-password")
    with db.transaction() as s:
        hashes = s.scalars(select(User.password_hash).order_by(User.name)).all()
    assert all(h.startswith("$argon2id$") for h in hashes) and hashes[0] != hashes[1]
    assert "same-password" not in "".join(hashes)
    assert users.check_password(db, "alice", "same-password") == alice
    assert users.check_password(db, "alice", "wrong-password") is None
    assert users.check_password(db, "nobody", "same-password") is None
    with pytest.raises(WebError, match="exists already"):
        users.add_user(db, "alice", "another-password")
    with pytest.raises(WebError, match="at least 8"):
        users.add_user(db, "carol", "short")
    with pytest.raises(WebError, match="invalid user name"):
        users.add_user(db, "bad name", "long-enough")


def test_logins_expire_and_end(db, alice):
    ticket = users.new_ticket(db, alice)
    token, expires = users.redeem_ticket(db, ticket, timedelta(hours=1))
    assert users.redeem_ticket(db, ticket, timedelta(hours=1)) is None, "a ticket works once"
    assert users.session_user(db, token) == alice
    assert users.session_user(db, token + "x") is None
    with db.transaction() as s:
        assert s.scalar(select(LoginSession.token_hash)) != token, "only the token's hash is stored"
        s.execute(text("UPDATE login_sessions SET expires_at = created_at"))
    assert users.session_user(db, token) is None, "an expired login opens nothing"
    token2, _ = users.redeem_ticket(db, users.new_ticket(db, alice), timedelta(hours=1))
    users.end_session(db, token2)
    assert users.session_user(db, token2) is None
    stale = users.new_ticket(db, alice)
    with db.transaction() as s:
        s.execute(text("UPDATE login_tickets SET expires_at = '2000-01-01 00:00:00'"))
    assert users.redeem_ticket(db, stale, timedelta(hours=1)) is None


def test_the_local_user_can_be_given_a_password_and_keeps_its_chats(db):
    local = users.local_user(db)
    started = _answered(db, local.id, None, "made without login", "ok")
    assert users.check_password(db, "local", "") is None, "no password, no login"
    assert users.add_user(db, "local", "now-a-password") == local
    assert users.check_password(db, "local", "now-a-password") == local
    assert [c.id for c in chats.list_chats(db, local.id)] == [started.chat_id]
