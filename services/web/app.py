"""TeleChat chat page (run by server.py: `telechat web`).

Conversations live in a database (``store``), not in the Streamlit session: the URL names the open one
(``?c=ID``), so a reload, a bookmark or a second tab shows the same chat. A reply is written by a
background thread (``replies.py``) piece by piece into the database; the page shows what is stored and,
while a reply grows, re-reads it a few times a second (a fragment). Stop marks the reply stopped in the
database, which ends the writer and the generation, from this tab, another one or after a reload.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# `streamlit run` puts services/web/ on sys.path, not the repo root; add it so a plain checkout works
# without `pip install`.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from services.web import auth, replies  # noqa: E402
from services.web.chat_list import chat_list, guarded, notify, open_chat, open_chat_id, transfer  # noqa: E402
from services.web.client import (  # noqa: E402
    APIClient,
    APIError,
    ChatParams,
    GenerationDefaults,
    Health,
    ModelInfo,
    error_from_record,
)
from services.web.conversation import Conversation, Message  # noqa: E402
from services.web.errors import WebError  # noqa: E402
from services.web.i18n import CUT_LABELS, DEFAULT_LANG, LANGS, Lang, error_text, t  # noqa: E402
from services.web.render import copy_button_html, display_markdown  # noqa: E402
from services.web.settings import get_settings  # noqa: E402
from services.web.store import Database, StorageError, chats, shared_database  # noqa: E402
from services.web.store.users import UserInfo  # noqa: E402

log = logging.getLogger("telechat.web")

# Plain comments, not attribute docstrings: Streamlit "magic" would print bare strings on the page.
# How often the page re-reads a reply while it is being written (each read is one small query).
LIVE_POLL_S = 0.25
# How long a health / model-list probe is reused; every click reruns the script.
PROBE_TTL_S = 5.0
CURSOR = "▌"
# Upper bound of the max-tokens field when the API does not report max_model_len.
MAX_TOKENS_CAP = 32768

# ---------------------------------------------------------------------------- API access


@st.cache_resource(show_spinner=False)
def _client() -> APIClient:
    """One HTTP client (connection pool) per server process, shared by the reply writers."""
    s = get_settings()
    return APIClient(s.api_url, s.api_key_value, connect_timeout=s.connect_timeout_s,
                     read_timeout=s.read_timeout_s)


@st.cache_data(ttl=PROBE_TTL_S, show_spinner=False)
def _probe() -> tuple[Health, list[ModelInfo]]:
    """API health and served models (empty when they cannot be read)."""
    client = _client()
    health = client.health()
    if health is Health.DOWN:
        return health, []
    try:
        return health, client.models()
    except APIError:
        return health, []


# ---------------------------------------------------------------------------- state + actions


def _init_state() -> None:
    ss = st.session_state
    ss.setdefault("editing", False)
    ss.setdefault("lang", DEFAULT_LANG)
    ss.setdefault("notice", None)  # (label key, fields) of a one-off message, shown by the next run
    ss.setdefault("confirm_delete", None)
    ss.setdefault("system_prompt", "")


def _reply_settings() -> tuple[chats.ReplySettings, ChatParams]:
    """What the next reply is asked with: the sidebar's model, parameters and system prompt."""
    ss = st.session_state
    params = ChatParams(
        temperature=ss.p_temperature, top_p=ss.p_top_p, top_k=int(ss.p_top_k), max_tokens=int(ss.p_max_tokens),
        repetition_penalty=ss.p_repetition_penalty, do_sample=ss.p_sample)
    settings = chats.ReplySettings(ss.get("model") or None, params.to_request(), ss.get("system_prompt") or "")
    return settings, params


def _start(action: Callable[..., chats.StartedReply], *args: Any) -> None:
    """Store a user action that asks for a reply (``chats.send`` ...) and start writing the reply."""
    ss = st.session_state
    ss.editing = False
    settings, params = _reply_settings()
    db = shared_database()
    started = guarded(action, db, *args, settings)
    if not started:
        return  # a notice says why; a chat deleted meanwhile is left by the next run
    if open_chat_id() != started.chat_id:
        open_chat(started.chat_id)
        ss.shown_chat = started.chat_id  # its system prompt is the sidebar's already
    replies.start(db, _client(), started, params)


def _send(text: str) -> None:
    text = text.strip()
    if text:
        _start(chats.send, open_chat_id(), text)


def _on_submit() -> None:
    _send(st.session_state.get("prompt") or "")


def _on_regenerate(chat_id: str) -> None:
    _start(chats.regenerate, chat_id)


def _on_edit_send(chat_id: str) -> None:
    text = (st.session_state.get("edit_text") or "").strip()
    if text:
        _start(chats.edit_last, chat_id, text)


def _on_edit(editing: bool) -> None:
    st.session_state.editing = editing


def _on_clear(chat_id: str) -> None:
    st.session_state.editing = False
    guarded(chats.clear, shared_database(), chat_id)


def _on_stop(reply_id: int) -> None:
    guarded(chats.stop_reply, shared_database(), reply_id)


def _on_logout() -> None:
    auth.logout(shared_database())


def _load_defaults(model_id: str | None, defaults: GenerationDefaults, max_tokens_cap: int) -> None:
    """Put the served generation defaults into the sidebar widgets (clamped to their ranges)."""
    ss = st.session_state
    ss.p_sample = defaults.do_sample
    ss.p_temperature = min(max(defaults.temperature, 0.0), 2.0)
    ss.p_top_p = min(max(defaults.top_p, 0.01), 1.0)
    ss.p_top_k = min(max(defaults.top_k, 0), 200)
    ss.p_max_tokens = min(max(defaults.max_tokens, 1), max_tokens_cap)
    ss.p_repetition_penalty = min(max(defaults.repetition_penalty, 1.0), 2.0)
    ss.params_model = model_id


# ---------------------------------------------------------------------------- sidebar


def _sidebar(db: Database, user: UserInfo, conv: Conversation | None, lang: Lang, models: list[ModelInfo]
             ) -> ModelInfo | None:
    """Conversations, language, model, system prompt, sampling. Returns the selected model."""
    ss = st.session_state
    with st.sidebar:
        chat_list(db, user, conv, lang)
        st.divider()
        st.segmented_control(t("language", lang), list(LANGS), format_func=LANGS.get, key="lang",
                             required=True)
        ids = [m.id for m in models]
        labels = {m.id: t("lora_of", lang, name=m.id, parent=m.parent) for m in models if m.parent}
        picked = st.selectbox(t("model", lang), ids, key="model", disabled=not ids,
                              placeholder=t("no_model", lang), format_func=lambda i: labels.get(i, i))
        model = next((m for m in models if m.id == picked), None)
        cap = (model.max_model_len if model and model.max_model_len else MAX_TOKENS_CAP)
        defaults = model.defaults if model else GenerationDefaults()
        if "params_model" not in ss or (model and ss.params_model != model.id):
            _load_defaults(model.id if model else None, defaults, cap)

        st.text_area(t("system_prompt", lang), key="system_prompt", height=80,
                     placeholder=t("system_prompt_placeholder", lang))
        with st.expander(t("generation", lang), icon=":material/tune:"):
            sample = st.toggle(t("sampling", lang), key="p_sample", help=t("sampling_help", lang))
            st.slider(t("temperature", lang), 0.0, 2.0, step=0.05, key="p_temperature",
                      disabled=not sample)
            st.slider(t("top_p", lang), 0.01, 1.0, step=0.01, key="p_top_p")
            st.number_input(t("top_k", lang), 0, 200, step=1, key="p_top_k")
            st.number_input(t("max_tokens", lang), 1, cap, step=64, key="p_max_tokens")
            st.slider(t("repetition_penalty", lang), 1.0, 2.0, step=0.01, key="p_repetition_penalty")
            st.button(t("reset_params", lang), icon=":material/restart_alt:", on_click=_load_defaults,
                      args=(model.id if model else None, defaults, cap), width="stretch")
        st.divider()
        transfer(db, user, conv, lang)
        if get_settings().web_auth == "password":
            st.divider()
            with st.container(horizontal=True, vertical_alignment="center"):
                st.caption(f":material/person: {t('signed_in_as', lang, name=user.name)}")
                st.button(t("logout", lang), key="logout", icon=":material/logout:", on_click=_on_logout)
        if get_settings().api_key_value:
            st.caption(f":material/lock: {t('api_key_set', lang)}")  # that it is set, never the value
    return model


# ---------------------------------------------------------------------------- main area


def _header(lang: Lang, health: Health, model: ModelInfo | None) -> None:
    st.title(t("page_title", lang), anchor=False)
    with st.container(horizontal=True, gap="small"):
        if health is Health.READY:
            st.badge(t("health_ready", lang), icon=":material/check_circle:", color="green")
        elif health is Health.LOADING:
            st.badge(t("health_loading", lang), icon=":material/hourglass_top:", color="orange")
        else:
            st.badge(t("health_down", lang), icon=":material/cloud_off:", color="red")
        if model is not None:
            st.badge(model.id, icon=":material/neurology:", color="gray")
            if model.demo:
                st.badge(t("demo_badge", lang), icon=":material/science:", color="violet",
                         help=t("demo_help", lang))
    st.caption(t("subtitle", lang))


def _welcome(lang: Lang) -> None:
    st.markdown(f"#### {t('welcome', lang)}")
    st.caption(t("try_these", lang))
    with st.container(horizontal=True):
        for key in ("example_1", "example_2", "example_3"):
            st.button(t(key, lang), key=f"ex_{key}", on_click=_send, args=(t(key, lang),),
                      icon=":material/chat_bubble:")


def _history(conv: Conversation, lang: Lang) -> None:
    """Every stored turn except a reply still being written (``_live_reply`` draws that one)."""
    last_user = max((i for i, m in enumerate(conv.messages) if m.role == "user"), default=-1)
    for i, msg in enumerate(conv.messages):
        if msg.streaming or not msg.content:
            continue  # an empty failed reply is shown as its error below
        with st.chat_message(msg.role):
            if st.session_state.editing and i == last_user:
                _edit_form(lang, msg.content, conv.id or "")
            else:
                _message(msg, lang)


def _message(msg: Message, lang: Lang) -> None:
    """A turn's text; for replies a copy button and how they ended."""
    st.markdown(display_markdown(msg.content))
    if msg.role != "assistant":
        return
    notes = []
    if msg.stopped:
        notes.append(f":material/stop_circle: {t(CUT_LABELS.get(msg.finish_reason or '', 'stopped'), lang)}")
    elif msg.finish_reason == "length":
        notes.append(f":material/more_horiz: {t('cut_off', lang)}")
    if msg.completion_tokens and msg.elapsed_s:
        notes.append(t("stats", lang, tokens=msg.completion_tokens, seconds=msg.elapsed_s))
    with st.container(horizontal=True, vertical_alignment="center", gap="small"):
        st.html(copy_button_html(msg.content, f"copy-{msg.id}", t("copy", lang), t("copied", lang)),
                width="content", unsafe_allow_javascript=True)
        if notes:
            st.caption(" · ".join(notes))


def _edit_form(lang: Lang, text: str, chat_id: str) -> None:
    with st.form("edit_form", border=False):
        st.text_area(t("edit_label", lang), value=text, key="edit_text")
        with st.container(horizontal=True):
            st.form_submit_button(t("send", lang), type="primary", icon=":material/send:",
                                  on_click=_on_edit_send, args=(chat_id,))
            st.form_submit_button(t("cancel", lang), on_click=_on_edit, args=(False,))


@st.fragment(run_every=LIVE_POLL_S)
def _live_reply(user_id: int, reply_id: int) -> None:
    """The reply being written, re-read from the database on every tick."""
    msg = chats.get_reply(shared_database(), user_id, reply_id)
    if msg is None or not msg.streaming:
        st.rerun()  # settled (here, in another tab or by the writer): draw the whole page again
    with st.container(key="live_reply"):
        with st.chat_message("assistant"):
            st.markdown(display_markdown(msg.content) + CURSOR)


def _actions(conv: Conversation, lang: Lang) -> None:
    with st.container(horizontal=True, key="actions"):
        if conv.can_regenerate:
            unanswered = conv.messages[-1].role == "user" or conv.failed_reply is not None
            st.button(t("retry" if unanswered else "regenerate", lang), key="regenerate",
                      icon=":material/refresh:", on_click=_on_regenerate, args=(conv.id,))
        if conv.last_user_text() is not None and not st.session_state.editing:
            st.button(t("edit", lang), key="edit", icon=":material/edit:", on_click=_on_edit, args=(True,))
        st.button(t("clear", lang), key="clear", icon=":material/delete_sweep:", on_click=_on_clear, args=(conv.id,))


def _errors(conv: Conversation | None, lang: Lang) -> None:
    """The error that cut the last reply, and a one-off notice from the last action."""
    ss = st.session_state
    last = conv.messages[-1] if conv and conv.messages else None
    if last is not None and last.error and last.finish_reason == "error":
        st.error(error_text(error_from_record(last.error), lang, api_url=get_settings().api_url),
                 icon=":material/error:")
    if ss.notice is not None:
        key, fields = ss.notice
        ss.notice = None
        st.warning(t(key, lang, **fields), icon=":material/info:")


def _open_conversation(db: Database, user: UserInfo) -> Conversation | None:
    """The URL's conversation if it is the user's (else a notice and a new chat); its system prompt is
    loaded into the sidebar when the page switches to it."""
    ss = st.session_state
    chat_id = open_chat_id()
    conv = chats.get_chat(db, user.id, chat_id) if chat_id else None
    if chat_id and conv is None:
        notify("chat_not_found")
        open_chat(None)
    if ss.get("shown_chat") != (conv.id if conv else None):
        if conv is not None:
            ss.system_prompt = conv.system_prompt
        ss.shown_chat = conv.id if conv else None
        ss.editing = False
    return conv


def main() -> None:
    st.set_page_config(page_title="TeleChat", page_icon="💬", layout="centered",
                       initial_sidebar_state="expanded")
    _init_state()
    lang: Lang = st.session_state.lang
    settings = get_settings()
    try:
        db = shared_database()
        if auth.finish_logout(lang):
            return
        user = auth.current_user(db, settings)
        if user is None:
            auth.login_page(db, lang)
            return
        conv = _open_conversation(db, user)
        health, models = _probe()
        model = _sidebar(db, user, conv, lang, models)
        _header(lang, health, model)
        live = conv.streaming_reply if conv else None
        st.chat_input(t("chat_placeholder", lang), key="prompt", on_submit=_on_submit, disabled=live is not None)
        if conv is None or not conv.messages:
            _welcome(lang)
        else:
            _history(conv, lang)
        if live is not None and live.id is not None:
            _live_reply(user.id, live.id)
            # Outside the fragment: a click reruns the whole page, which Streamlit always honours. Inside, the click
            # competed with the fragment's own reruns (four a second); on a loaded CI machine one went unanswered.
            st.button(t("stop", lang), key="stop", icon=":material/stop_circle:", type="primary", on_click=_on_stop,
                      args=(live.id,))
        _errors(conv, lang)
        if conv is not None and conv.messages and live is None:
            _actions(conv, lang)
    except (StorageError, WebError) as e:
        st.error(t("error_storage", lang, detail=str(e)), icon=":material/error:")
    except SQLAlchemyError as e:
        log.warning("database error: %s", e)
        st.error(t("error_storage", lang, detail=type(e).__name__), icon=":material/error:")
    except Exception:  # the page must never show a traceback; Stop/rerun are BaseExceptions
        log.exception("web page failed")
        st.error(t("error_unexpected", lang), icon=":material/error:")


main()
