"""Users, their passwords (argon2id, salted, via argon2-cffi) and their logins.

A login is a random token in an HttpOnly cookie; the database keeps only its SHA-256, so a copy of the
database opens no session. The page checks the password, then hands the browser a one-time ticket
(valid for a minute) that ``server.py`` trades for the cookie: the token itself never passes through
the page's JavaScript.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update

from services.web.errors import WebError
from services.web.store.database import Database
from services.web.store.models import LoginSession, LoginTicket, User, utcnow

LOCAL_USER = "local"
"""The one user of WEB_AUTH=none. It has no password until `add-user local` gives it one."""
MIN_PASSWORD_CHARS = 8
TICKET_TTL = timedelta(seconds=60)
NAME_PATTERN = re.compile(r"^[\w.@-]{1,64}$")

_hasher = PasswordHasher()  # argon2id with the library's RFC 9106 defaults; a fresh salt per hash


@dataclass(frozen=True)
class UserInfo:
    """Who is logged in."""

    id: int
    name: str


def local_user(db: Database) -> UserInfo:
    """The user of WEB_AUTH=none (created on first use)."""
    with db.transaction() as s:
        user = s.scalar(select(User).where(User.name == LOCAL_USER))
        if user is None:
            user = User(name=LOCAL_USER, password_hash=None)
            s.add(user)
            s.flush()
        return UserInfo(user.id, user.name)


def add_user(db: Database, name: str, password: str) -> UserInfo:
    """Create a user with a password. The local user, which has none, gets this one (and keeps its chats);
    any other taken name is an error."""
    if not NAME_PATTERN.match(name):
        raise WebError(f"invalid user name {name!r}: 1-64 letters, digits or . _ @ -")
    if len(password) < MIN_PASSWORD_CHARS:
        raise WebError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    with db.transaction() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is not None and user.password_hash is not None:
            raise WebError(f"user {name!r} exists already")
        if user is None:
            user = User(name=name)
            s.add(user)
        user.password_hash = _hasher.hash(password)
        s.flush()
        return UserInfo(user.id, user.name)


def check_password(db: Database, name: str, password: str) -> UserInfo | None:
    """The user when the password is right, else None (the same for an unknown name)."""
    with db.transaction() as s:
        row = s.execute(select(User.id, User.password_hash).where(User.name == name)).first()
    user_id, stored = row if row is not None else (None, None)
    try:  # outside the transaction: hashing takes a while and must not hold SQLite's write lock
        _hasher.verify(stored or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if user_id is None or stored is None:
        return None
    if _hasher.check_needs_rehash(stored):  # the library's defaults grew stronger since
        with db.transaction() as s:
            s.execute(update(User).where(User.id == user_id).values(password_hash=_hasher.hash(password)))
    return UserInfo(user_id, name)


# ---------------------------------------------------------------------------- logins


def new_ticket(db: Database, user: UserInfo) -> str:
    """A one-time ticket for ``user``'s login, valid for a minute."""
    ticket = secrets.token_urlsafe(32)
    with db.transaction() as s:
        s.add(LoginTicket(ticket_hash=_digest(ticket), user_id=user.id, expires_at=utcnow() + TICKET_TTL))
    return ticket


def redeem_ticket(db: Database, ticket: str, ttl: timedelta) -> tuple[str, datetime] | None:
    """Trade a ticket (once) for a new login: (token, expiry), or None when it is unknown or expired."""
    now = utcnow()
    with db.transaction() as s:
        row = s.get(LoginTicket, _digest(ticket))
        if row is None:
            return None
        user_id, valid = row.user_id, row.expires_at > now
        s.delete(row)
        s.execute(delete(LoginTicket).where(LoginTicket.expires_at <= now))
        if not valid:
            return None
        token = secrets.token_urlsafe(32)
        s.add(LoginSession(token_hash=_digest(token), user_id=user_id, created_at=now, expires_at=now + ttl))
        s.execute(delete(LoginSession).where(LoginSession.expires_at <= now))
        return token, now + ttl


def session_user(db: Database, token: str) -> UserInfo | None:
    """The user of a login token, or None when it is unknown or expired."""
    with db.transaction() as s:
        row = s.execute(select(User.id, User.name).join(LoginSession, LoginSession.user_id == User.id)
                        .where(LoginSession.token_hash == _digest(token), LoginSession.expires_at > utcnow())).first()
        return UserInfo(*row) if row else None


def end_session(db: Database, token: str) -> None:
    """Log out: the token opens nothing any more."""
    with db.transaction() as s:
        s.execute(delete(LoginSession).where(LoginSession.token_hash == _digest(token)))


@cache
def _dummy_hash() -> str:
    """Checked against when the name is unknown, so a wrong name costs as long as a wrong password."""
    return _hasher.hash(secrets.token_hex(16))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
