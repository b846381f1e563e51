"""Who is using the page: the local user (WEB_AUTH=none), or a logged-in one (WEB_AUTH=password).

Every page run checks the login token against the database (``users.session_user``), so an expired or
logged-out session stops working at once, in every tab. The token comes from this Streamlit session, or
from the HttpOnly cookie the browser sent when the page opened (``server.py`` sets it).
"""

from __future__ import annotations

import json
import time

import streamlit as st

from services.web.i18n import Lang, t
from services.web.settings import WebSettings, get_settings
from services.web.store import Database, users
from services.web.store.users import UserInfo

COOKIE = "telechat_session"
SESSION_PATH = "/_telechat/session"
LOGOUT_PATH = "/_telechat/logout"
# Each failed login waits this long: a few guesses per second at most, from any one page.
FAILED_LOGIN_DELAY_S = 1.0


def current_user(db: Database, settings: WebSettings) -> UserInfo | None:
    """The user of this page run, or None when a login is needed."""
    ss = st.session_state
    if settings.web_auth == "none":
        if "local_user" not in ss:
            ss.local_user = users.local_user(db)
        return ss.local_user
    cookie = st.context.cookies.get(COOKIE)
    # A str from a browser; Streamlit's AppTest has a stand-in context without cookies.
    token = ss.get("login_token") or (cookie if isinstance(cookie, str) else None)
    user = users.session_user(db, token) if token else None
    if user is None:
        ss.pop("login_token", None)
    else:
        ss.login_token = token
    return user


def acting_user(db: Database) -> UserInfo | None:
    """The user a callback acts for, checked again (the login may have ended since the page was drawn)."""
    return current_user(db, get_settings())


def login_page(db: Database, lang: Lang) -> None:
    """The login form; after a right password the browser trades a ticket for the cookie and reloads."""
    ss = st.session_state
    st.title(t("page_title", lang), anchor=False)
    if ss.get("login_ticket"):
        # The ticket goes to server.py in the body of a same-origin POST; the cookie it sets is HttpOnly.
        st.html(_post_and_reload(SESSION_PATH, ss.pop("login_ticket"), t("signing_in", lang),
                                 t("login_broken", lang)), unsafe_allow_javascript=True)
        return
    with st.form("login", border=True, width=420):
        st.subheader(t("login_title", lang), anchor=False)
        st.text_input(t("user_name", lang), key="login_name", autocomplete="username")
        st.text_input(t("password", lang), key="login_password", type="password", autocomplete="current-password")
        st.form_submit_button(t("login", lang), type="primary", on_click=_on_login, args=(db,),
                              icon=":material/login:")
    if ss.get("login_failed"):
        st.error(t("login_failed", lang), icon=":material/error:")


def logout(db: Database) -> None:
    """End this login in the database now; the next run deletes the cookie and reloads."""
    ss = st.session_state
    token = ss.pop("login_token", None)
    if token:
        users.end_session(db, token)
    ss.logging_out = True


def finish_logout(lang: Lang) -> bool:
    """After ``logout``: have the browser drop the cookie and reload. True when it did (draw nothing else)."""
    if not st.session_state.pop("logging_out", False):
        return False
    st.html(_post_and_reload(LOGOUT_PATH, "", t("signing_out", lang), t("login_broken", lang)),
            unsafe_allow_javascript=True)
    return True


def _on_login(db: Database) -> None:
    ss = st.session_state
    name = (ss.get("login_name") or "").strip()
    user = users.check_password(db, name, ss.get("login_password") or "")
    ss.login_password = ""
    if user is None:
        time.sleep(FAILED_LOGIN_DELAY_S)
        ss.login_failed = True
        return
    ss.login_failed = False
    ss.login_ticket = users.new_ticket(db, user)


def _post_and_reload(path: str, body: str, waiting: str, failed: str) -> str:
    """A status line and the script that POSTs ``body`` to ``path`` (relative to the page) and reloads."""
    return f"""<p id="telechat-auth">{waiting}</p>
<script>
fetch({json.dumps(path.lstrip("/"))}, {{method: "POST", body: {json.dumps(body)}, credentials: "same-origin",
                                         headers: {{"Content-Type": "text/plain"}}}})
  .then(r => {{ if (!r.ok) throw new Error(r.status); window.location.reload(); }})
  .catch(() => {{ document.getElementById("telechat-auth").textContent = {json.dumps(failed)}; }});
</script>"""
