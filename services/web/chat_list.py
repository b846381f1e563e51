"""The sidebar's conversation list: new chat, search, switch, rename, delete (confirmed), import, export.

The open conversation is the URL's ``c`` query parameter, so a reload, a bookmark or a second tab opens
the same chat; whose it is, is checked by ``store.chats`` on every read and write.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from services.web import auth
from services.web.conversation import ChatImportError, Conversation
from services.web.errors import WebError
from services.web.i18n import Lang, t
from services.web.store import Database, chats
from services.web.store.users import UserInfo

CHAT_PARAM = "c"
LIST_HEIGHT_PX = 320
LIST_SCROLL_AFTER = 8
# Titles read from the left, like a list, not centred like buttons.
LIST_STYLE = ("<style>.st-key-chat_list button, .st-key-chat_list button > div "
              "{justify-content: flex-start; text-align: left;}</style>")


def open_chat_id() -> str | None:
    """The conversation the URL names (None: a new chat)."""
    return st.query_params.get(CHAT_PARAM) or None


def open_chat(chat_id: str | None) -> None:
    """Show ``chat_id`` (None: a new, empty chat) and put it in the URL."""
    if chat_id is None:
        st.query_params.pop(CHAT_PARAM, None)
    else:
        st.query_params[CHAT_PARAM] = chat_id
    st.session_state.editing = False
    st.session_state.confirm_delete = None


def notify(key: str, **fields: object) -> None:
    """A one-line notice for the next page run (a label of i18n.py and its fields)."""
    st.session_state.notice = (key, fields)


def chat_list(db: Database, user: UserInfo, conv: Conversation | None, lang: Lang) -> None:
    """New chat, search box and the user's conversations; the open one has a rename / delete menu."""
    st.button(t("new_chat", lang), key="new_chat", icon=":material/edit_square:", on_click=open_chat, args=(None,),
              width="stretch")
    query = st.text_input(t("search_chats", lang), key="chat_search", placeholder=t("search_chats", lang),
                          label_visibility="collapsed", icon=":material/search:")
    found = chats.list_chats(db, user.id, query or "")
    st.html(LIST_STYLE)
    # A long list scrolls inside its own box; a short one takes only the room it needs.
    height = LIST_HEIGHT_PX if len(found) > LIST_SCROLL_AFTER else "content"
    with st.container(height=height, border=False, key="chat_list"):
        if not found:
            st.caption(t("no_match" if query else "no_chats", lang))
        for item in found:
            title = item.title or t("untitled", lang)
            if conv is not None and item.id == conv.id:
                with st.container(horizontal=True, gap="small", vertical_alignment="center", key="chat_current"):
                    st.button(title, key=f"chat_{item.id}", type="secondary", width="stretch")
                    _chat_menu(db, user, conv, lang)
            else:
                st.button(title, key=f"chat_{item.id}", type="tertiary", width="stretch", on_click=open_chat,
                          args=(item.id,))


def _chat_menu(db: Database, user: UserInfo, conv: Conversation, lang: Lang) -> None:
    assert conv.id is not None
    with st.popover("", icon=":material/more_vert:", help=t("chat_menu", lang), key="chat_menu"):
        st.text_input(t("title_label", lang), value=conv.title, key=f"title_{conv.id}", max_chars=chats.MAX_TITLE_CHARS)
        st.button(t("rename", lang), key="rename", icon=":material/edit:", on_click=_on_rename, args=(db, conv.id))
        if st.session_state.get("confirm_delete") == conv.id:
            st.warning(t("confirm_delete", lang), icon=":material/warning:")
            with st.container(horizontal=True):
                st.button(t("delete_confirm", lang), key="delete_confirm", type="primary", icon=":material/delete:",
                          on_click=_on_delete, args=(db, conv.id))
                st.button(t("cancel", lang), key="delete_cancel", on_click=_ask_delete, args=(None,))
        else:
            st.button(t("delete_chat", lang), key="delete_chat", icon=":material/delete:", on_click=_ask_delete,
                      args=(conv.id,))


def transfer(db: Database, user: UserInfo, conv: Conversation | None, lang: Lang) -> None:
    """Export the open chat (JSON, Markdown) and import a JSON export as a new chat."""
    ss = st.session_state
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    empty = conv is None or not any(m.content for m in conv.messages)
    st.subheader(t("export", lang), anchor=False)
    with st.container(horizontal=True):
        st.download_button(
            t("export_json", lang), conv.to_json() if conv else "", file_name=f"telechat-{stamp}.json",
            mime="application/json", key="export_json", icon=":material/data_object:", on_click="ignore",
            disabled=empty, width="stretch")
        st.download_button(
            t("export_md", lang), conv.to_markdown(lang) if conv else "", file_name=f"telechat-{stamp}.md",
            mime="text/markdown", key="export_md", icon=":material/description:", on_click="ignore",
            disabled=empty, width="stretch")
    ss.setdefault("import_n", 0)  # a new key empties the uploader once its file is imported
    st.file_uploader(t("import", lang), type=["json"], key=f"import_{ss.import_n}", help=t("import_help", lang),
                     on_change=_on_import, args=(db, f"import_{ss.import_n}"))


# ---------------------------------------------------------------------------- callbacks


def _on_rename(db: Database, chat_id: str) -> None:
    title = st.session_state.get(f"title_{chat_id}") or ""
    guarded(chats.rename, db, chat_id, title)


def _ask_delete(chat_id: str | None) -> None:
    st.session_state.confirm_delete = chat_id


def _on_delete(db: Database, chat_id: str) -> None:
    if guarded(chats.delete_chat, db, chat_id):
        open_chat(None)


def _on_import(db: Database, key: str) -> None:
    upload = st.session_state.get(key)
    if upload is None:
        return
    st.session_state.import_n += 1
    try:
        conv = Conversation.from_json(upload.getvalue())
    except ChatImportError as e:
        notify("import_failed", detail=str(e))
        return
    chat_id = guarded(chats.import_chat, db, conv)
    if chat_id:
        open_chat(chat_id)


def guarded(action: Callable[..., Any], db: Database, *args: Any) -> Any:
    """Run ``action(db, user_id, *args)`` for the user the page is acting for: its result (True for None),
    or None when the login ended, the conversation is gone or busy, or the database failed (a notice)."""
    try:
        user = auth.acting_user(db)
        if user is None:
            return None  # the next run shows the login form
        return action(db, user.id, *args) or True
    except chats.ChatNotFound:
        notify("chat_not_found")
    except chats.ChatBusy:
        notify("chat_busy")
    except WebError as e:
        notify("error_storage", detail=str(e))
    except SQLAlchemyError as e:
        notify("error_storage", detail=type(e).__name__)
    return None
