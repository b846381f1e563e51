"""TeleChat chat page: `streamlit run services/web/app.py` (or `telechat web`).

How a reply streams (and stops): the script run that streams blocks until the reply ends. Any
click meanwhile (Stop, a new message, a sidebar change) makes Streamlit interrupt that run at its
next `st.*` call and start a new one. The reply is written into session state as it arrives and
the HTTP stream sits in a `with` block, so the interruption keeps the partial text and closes the
connection, which makes the API abort the generation. The next run marks the reply stopped.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from pathlib import Path

# `streamlit run services/web/app.py` puts services/web/ on sys.path, not the repo root; add it
# so a plain checkout works without `pip install`.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from services.web.client import (  # noqa: E402
    APIClient,
    APIError,
    APINotReady,
    APIUnavailable,
    ChatParams,
    GenerationDefaults,
    Health,
    ModelInfo,
)
from services.web.conversation import Conversation, Message  # noqa: E402
from services.web.i18n import DEFAULT_LANG, LANGS, Lang, error_text, t  # noqa: E402
from services.web.settings import get_settings  # noqa: E402

log = logging.getLogger("telechat.web")

# Plain comments, not attribute docstrings: Streamlit "magic" would print bare strings on the page.
# Repaint the streaming reply at most 20 times a second: re-rendering Markdown for every token
# makes long replies lag behind the stream.
RENDER_INTERVAL_S = 0.05
# How long a health / model-list probe is reused; every click reruns the script.
PROBE_TTL_S = 5.0
CURSOR = "▌"
# Upper bound of the max-tokens field when the API does not report max_model_len.
MAX_TOKENS_CAP = 32768

# ---------------------------------------------------------------------------- API access


@st.cache_resource(show_spinner=False)
def _client() -> APIClient:
    """One HTTP client (connection pool) per server process."""
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


def _served_model(selected: ModelInfo | None) -> ModelInfo:
    """The model to ask; re-reads the list when the cached probe had none (API just came up)."""
    if selected is not None:
        return selected
    _probe.clear()
    models = _client().models()
    if not models:
        raise APINotReady("The API lists no model.")
    return models[0]


# ---------------------------------------------------------------------------- state + actions


def _init_state() -> None:
    ss = st.session_state
    ss.setdefault("conv", Conversation())
    ss.setdefault("pending", False)  # a reply should be generated in this run
    ss.setdefault("error", None)  # the APIError of the last request, shown until the next action
    ss.setdefault("editing", False)
    ss.setdefault("lang", DEFAULT_LANG)


def _begin_action() -> Conversation:
    """Common start of every user action: settle an interrupted reply, forget the last error."""
    conv: Conversation = st.session_state.conv
    conv.finish_interrupted()
    st.session_state.error = None
    st.session_state.editing = False
    return conv


def _send(text: str) -> None:
    text = text.strip()
    if text:
        _begin_action().add_user(text)
        st.session_state.pending = True


def _on_submit() -> None:
    _send(st.session_state.get("prompt") or "")


def _on_regenerate() -> None:
    _begin_action().regenerate()
    st.session_state.pending = True


def _on_edit() -> None:
    _begin_action()
    st.session_state.editing = True


def _on_edit_send() -> None:
    text = (st.session_state.get("edit_text") or "").strip()
    conv = _begin_action()
    if text:
        conv.edit_last_user(text)
        st.session_state.pending = True


def _on_clear() -> None:
    _begin_action().clear()


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


def _sidebar(lang: Lang, models: list[ModelInfo]) -> tuple[ModelInfo | None, ChatParams, str]:
    """Language, model, system prompt, sampling, export. Returns (model, params, system prompt)."""
    ss = st.session_state
    with st.sidebar:
        st.segmented_control(t("language", lang), list(LANGS), format_func=LANGS.get, key="lang",
                             required=True)
        ids = [m.id for m in models]
        picked = st.selectbox(t("model", lang), ids, key="model", disabled=not ids,
                              placeholder=t("no_model", lang))
        model = next((m for m in models if m.id == picked), None)
        cap = (model.max_model_len if model and model.max_model_len else MAX_TOKENS_CAP)
        defaults = model.defaults if model else GenerationDefaults()
        if "params_model" not in ss or (model and ss.params_model != model.id):
            _load_defaults(model.id if model else None, defaults, cap)

        system_prompt = st.text_area(t("system_prompt", lang), key="system_prompt", height=80,
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

        params = ChatParams(
            temperature=ss.p_temperature, top_p=ss.p_top_p, top_k=int(ss.p_top_k),
            max_tokens=int(ss.p_max_tokens), repetition_penalty=ss.p_repetition_penalty,
            do_sample=sample,
        )
    return model, params, system_prompt


def _sidebar_footer(lang: Lang, model_id: str, params: ChatParams, system_prompt: str) -> None:
    """Export buttons, drawn last so that they hold a reply streamed during this run."""
    conv: Conversation = st.session_state.conv
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    empty = not conv.messages
    with st.sidebar:
        st.subheader(t("export", lang))
        with st.container(horizontal=True):
            st.download_button(
                t("export_json", lang), conv.to_json(model=model_id, system_prompt=system_prompt,
                                                     params=params.to_request()),
                file_name=f"telechat-{stamp}.json", mime="application/json", key="export_json",
                icon=":material/data_object:", on_click="ignore", disabled=empty, width="stretch",
            )
            st.download_button(
                t("export_md", lang), conv.to_markdown(lang, model=model_id, system_prompt=system_prompt),
                file_name=f"telechat-{stamp}.md", mime="text/markdown", key="export_md",
                icon=":material/description:", on_click="ignore", disabled=empty, width="stretch",
            )
        if get_settings().api_key_value:
            st.caption(f":material/lock: {t('api_key_set', lang)}")  # that it is set, never the value


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


def _history(lang: Lang) -> None:
    conv: Conversation = st.session_state.conv
    last_user = max((i for i, m in enumerate(conv.messages) if m.role == "user"), default=-1)
    for i, msg in enumerate(conv.messages):
        with st.chat_message(msg.role):
            if st.session_state.editing and i == last_user:
                _edit_form(lang, msg.content)
            else:
                _message(msg, lang)


def _message(msg: Message, lang: Lang) -> None:
    """A turn's text, and for replies how they ended."""
    st.markdown(msg.content)
    notes = []
    if msg.stopped:
        notes.append(f":material/stop_circle: {t('stopped', lang)}")
    elif msg.finish_reason == "length":
        notes.append(f":material/more_horiz: {t('cut_off', lang)}")
    if msg.completion_tokens and msg.elapsed_s:
        notes.append(t("stats", lang, tokens=msg.completion_tokens, seconds=msg.elapsed_s))
    if notes:
        st.caption(" · ".join(notes))


def _edit_form(lang: Lang, text: str) -> None:
    with st.form("edit_form", border=False):
        st.text_area(t("edit_label", lang), value=text, key="edit_text")
        with st.container(horizontal=True):
            st.form_submit_button(t("send", lang), type="primary", icon=":material/send:",
                                  on_click=_on_edit_send)
            st.form_submit_button(t("cancel", lang), on_click=_begin_action)


def _actions(lang: Lang) -> None:
    conv: Conversation = st.session_state.conv
    with st.container(horizontal=True, key="actions"):
        if conv.can_regenerate:
            unanswered = conv.messages[-1].role == "user"
            st.button(t("retry" if unanswered else "regenerate", lang), key="regenerate",
                      icon=":material/refresh:", on_click=_on_regenerate)
        if conv.last_user_text() is not None and not st.session_state.editing:
            st.button(t("edit", lang), key="edit", icon=":material/edit:", on_click=_on_edit)
        st.button(t("clear", lang), key="clear", icon=":material/delete_sweep:", on_click=_on_clear)


def _stream_reply(lang: Lang, model: ModelInfo | None, params: ChatParams, system_prompt: str) -> None:
    """Stream one reply into the conversation, drawing it as it grows, then settle it in place."""
    conv: Conversation = st.session_state.conv
    messages = conv.api_messages(system_prompt)
    reply = conv.begin_reply()
    slot = st.empty()  # the whole bubble, so that a failed reply leaves no empty bubble behind
    with slot.chat_message("assistant"):
        body = st.empty()
        body.markdown(CURSOR)
    stop_slot = st.empty()
    stop_slot.button(t("stop", lang), key="stop", icon=":material/stop_circle:", type="primary")
    started = time.monotonic()
    try:
        model_id = _served_model(model).id
        with _client().stream_chat(model_id, messages, params) as stream:
            shown = 0.0
            for delta in stream:
                reply.content += delta  # in session state at once: survives an interruption
                if time.monotonic() - shown >= RENDER_INTERVAL_S:
                    body.markdown(reply.content + CURSOR)
                    shown = time.monotonic()
    except APIError as err:
        log.warning("chat request failed: %r (%s)", err, err.detail)
        st.session_state.error = err
        if isinstance(err, APIUnavailable):
            _probe.clear()  # show "API unavailable" from the next click on, not after the probe TTL
        conv.finish_interrupted()  # keep what arrived before the failure, marked cut short
    else:
        reply.streaming = False
        reply.finish_reason = stream.finish_reason
        reply.completion_tokens = (stream.usage or {}).get("completion_tokens")
    reply.elapsed_s = time.monotonic() - started
    stop_slot.empty()
    if any(m is reply for m in conv.messages):  # a failed reply with no text was dropped
        with slot.chat_message("assistant"):
            _message(reply, lang)
    else:
        slot.empty()


def main() -> None:
    st.set_page_config(page_title="TeleChat", page_icon="💬", layout="centered",
                       initial_sidebar_state="expanded")
    _init_state()
    lang: Lang = st.session_state.lang
    try:
        # Reaching here with a reply still "streaming" means its run was interrupted.
        st.session_state.conv.finish_interrupted()
        health, models = _probe()
        model, params, system_prompt = _sidebar(lang, models)
        _header(lang, health, model)
        st.chat_input(t("chat_placeholder", lang), key="prompt", on_submit=_on_submit)
        conv: Conversation = st.session_state.conv
        if not conv.messages and not st.session_state.pending:
            _welcome(lang)
        _history(lang)
        if st.session_state.pending:
            st.session_state.pending = False
            _stream_reply(lang, model, params, system_prompt)
        if st.session_state.error is not None:
            st.error(error_text(st.session_state.error, lang, api_url=get_settings().api_url),
                     icon=":material/error:")
        if conv.messages:
            _actions(lang)
        _sidebar_footer(lang, model.id if model else "", params, system_prompt)
    except Exception:  # the page must never show a traceback; Stop/rerun are BaseExceptions
        log.exception("web page failed")
        st.error(t("error_unexpected", lang), icon=":material/error:")


main()
