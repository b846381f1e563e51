"""Replies are written by threads of the web process, not by page runs: a page only shows what is stored.

So a reply goes on when its page reloads, closes, or switches to another chat, and a second tab sees it
grow. Stop works from anywhere because it goes through the database (``chats.stop_reply``): the writer's
next ``append_chunk`` returns False, and leaving the ``stream_chat`` block hangs up on the API, which
aborts the generation. When the web server shuts down, replies still being written are kept, cut
(``interrupted``: ``interrupt_all`` from server.py's lifespan); a killed process leaves them to the stale
check (``chats``).
"""

from __future__ import annotations

import logging
import threading
import time

from services.web.client import APIClient, APIError, APINotReady, ChatParams, error_record
from services.web.store import Database
from services.web.store import chats

log = logging.getLogger("telechat.web")

_lock = threading.Lock()
_writers: dict[int, ReplyWriter] = {}


class ReplyWriter(threading.Thread):
    """Streams one reply from the API into the database, piece by piece."""

    def __init__(self, db: Database, client: APIClient, reply: chats.StartedReply, params: ChatParams) -> None:
        super().__init__(name=f"reply-{reply.reply_id}", daemon=True)
        self.db, self.client, self.reply, self.params = db, client, reply, params

    def run(self) -> None:
        reply_id = self.reply.reply_id
        started = time.monotonic()
        first: float | None = None
        try:
            model = self.reply.model or self._served_model()
            with self.client.stream_chat(model, self.reply.messages, self.params) as stream:
                for seq, delta in enumerate(stream):
                    if first is None:
                        first = time.monotonic() - started
                    if not chats.append_chunk(self.db, reply_id, seq, delta):
                        return  # stopped or deleted: leaving the block closes the connection
            usage = stream.usage or {}
            chats.finish_reply(self.db, reply_id, finish_reason=stream.finish_reason,
                               prompt_tokens=usage.get("prompt_tokens"),
                               completion_tokens=usage.get("completion_tokens"),
                               first_token_s=first, elapsed_s=time.monotonic() - started)
        except APIError as err:
            log.warning("reply %d failed: %r (%s)", reply_id, err, err.detail)
            chats.fail_reply(self.db, reply_id, error_record(err), first_token_s=first,
                             elapsed_s=time.monotonic() - started)
        except Exception as err:  # a database error: the stale check settles the reply later
            log.exception("reply %d: writer failed", reply_id)
            try:
                chats.fail_reply(self.db, reply_id, {"key": "error_unexpected", "message": type(err).__name__},
                                 first_token_s=first, elapsed_s=time.monotonic() - started)
            except Exception:
                log.exception("reply %d: cannot record the failure", reply_id)
        finally:
            with _lock:
                _writers.pop(reply_id, None)

    def _served_model(self) -> str:
        """The first served model, when the page had no model list to pick from (API just came up)."""
        models = self.client.models()
        if not models:
            raise APINotReady("The API lists no model.")
        chats.set_reply_model(self.db, self.reply.reply_id, models[0].id)
        return models[0].id


def start(db: Database, client: APIClient, reply: chats.StartedReply, params: ChatParams) -> ReplyWriter:
    """Start writing a stored (streaming) reply in the background."""
    writer = ReplyWriter(db, client, reply, params)
    with _lock:
        _writers[reply.reply_id] = writer
    writer.start()
    return writer


def interrupt_all() -> int:
    """Settle every reply this process is writing as cut (``interrupted``); how many were."""
    with _lock:
        writers = list(_writers.values())
    return sum(chats.interrupt_reply(w.db, w.reply.reply_id) for w in writers)

