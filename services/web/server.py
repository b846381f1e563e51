"""The web UI's server: Streamlit's ASGI app running the chat page (app.py), plus two small routes that
put a login into an HttpOnly cookie and take it out again (WEB_AUTH=password).

``streamlit run services/web/server.py`` (what ``telechat web`` runs) finds ``app`` below and serves it.
A Streamlit page can read cookies (``st.context.cookies``) but not set them, hence the routes:

- ``POST /_telechat/session`` with a one-time ticket as the body (the page made it after checking the
  password) answers 204 with the session cookie;
- ``POST /_telechat/logout`` ends the cookie's session and deletes the cookie.

Its lifespan settles the replies still being written when the server stops.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

# `streamlit run services/web/server.py` puts services/web/ on sys.path, not the repo root.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from services.web import replies  # noqa: E402
from services.web.auth import COOKIE, LOGOUT_PATH, SESSION_PATH  # noqa: E402
from services.web.settings import get_settings  # noqa: E402
from services.web.store import shared_database, users  # noqa: E402

MAX_TICKET_BYTES = 256


def _same_origin(request: Request) -> bool:
    """A browser names the page that sent a POST; only our own pages may log in or out."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def _secure(request: Request) -> bool:
    """HTTPS, directly or behind a proxy that says so: then the cookie is sent over HTTPS only."""
    return request.headers.get("x-forwarded-proto", request.url.scheme) == "https"


async def start_session(request: Request) -> Response:
    """Trade a login ticket for the session cookie."""
    if not _same_origin(request):
        return Response("cross-origin request refused", status_code=403)
    ticket = (await request.body())[:MAX_TICKET_BYTES].decode(errors="replace").strip()
    settings = get_settings()
    login = await run_in_threadpool(users.redeem_ticket, shared_database(), ticket, settings.session_ttl)
    if login is None:
        return Response("unknown or expired login ticket", status_code=403)
    token, _expires = login
    response = Response(status_code=204)
    response.set_cookie(COOKIE, token, max_age=int(settings.session_ttl.total_seconds()), path="/",
                        httponly=True, samesite="strict", secure=_secure(request))
    return response


async def end_session(request: Request) -> Response:
    """Log out: the cookie's session ends on the server, and the cookie goes."""
    if not _same_origin(request):
        return Response("cross-origin request refused", status_code=403)
    token = request.cookies.get(COOKIE)
    if token:
        await run_in_threadpool(users.end_session, shared_database(), token)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
    return response


@asynccontextmanager
async def lifespan(_app: st.App) -> AsyncIterator[None]:
    """On shutdown (SIGTERM, Ctrl+C) keep the replies being written, marked interrupted. Not at exit: uvicorn
    ends the process by raising the signal again once it has shut down, which skips ``atexit``."""
    yield
    await run_in_threadpool(replies.interrupt_all)


app = st.App("app.py", lifespan=lifespan, routes=[Route(SESSION_PATH, start_session, methods=["POST"]),
                                                  Route(LOGOUT_PATH, end_session, methods=["POST"])])
