"""The TeleChat chat format, defined once (docs/chat-format.md): used by the API, SFT masking and GPTQ calibration.

Ids of a conversation (no BOS, ever)::

    [<_system>] + ids(system)                         optional, first (see below)
    <_user> + ids(q1)  <_bot> + ids(a1) + <_end>      one history turn, oldest first
    ...
    <_user> + ids(q)   <_bot>                         the prompt for the next answer

Text form: ``<_user>q1<_bot>a1<_end><_user>q2<_bot>``.

System prompt: the official chat() has none. When the vocabulary holds ``<_system>`` (12B: id 22,
the demo tokenizer) it is written as ``<_system>`` + ids(content); otherwise (7B) its text is
prepended raw, before the first ``<_user>``.

``ids(text)`` is ``tokenizer.encode(text, add_special_tokens=False)`` of each content on its own,
as the official chat and SFT code do. The TeleChat tokenizers (``telechat.tokenizer``) treat the
markers as special tokens that split the text, so tokenizing the rendered text gives the same ids
segment by segment (same SentencePiece dummy prefix per segment): that is what makes
``apply_chat_template`` with :data:`CHAT_TEMPLATE` equal to :meth:`ChatFormat.encode_prompt` for
contents without markers.

Markers typed inside a content (``content_markers``): by default (``"text"``) they are plain text,
encoded like any other characters, so a user cannot forge an assistant turn or a second system
prompt; no content ever yields a control id. ``"control"`` reads them as the markers themselves,
as the official code and service do (a trusted client building raw dialogs needs that).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

USER, BOT, END, SYSTEM = "<_user>", "<_bot>", "<_end>", "<_system>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "bot": "assistant"}
"""Accepted roles; ``bot`` (official TeleChat) is the same as ``assistant``, ``developer`` (OpenAI's newer
name for instructions) the same as ``system``, as vLLM reads it."""

Turn = tuple[str, str]  # (role, content) with role in system|user|assistant
ContentMarkers = Literal["text", "control"]
"""How marker strings inside a message's content are read (see the module doc)."""


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """Check a message list and return it as ``(role, content)`` pairs, ``bot`` mapped to ``assistant``.

    Rules: non-empty list of ``{"role", "content"}`` dicts; one optional system message, first;
    then user and assistant alternate, starting with user. Raises ``ValueError`` otherwise.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role = ROLES.get(message["role"]) if isinstance(message["role"], str) else None
        if role is None:
            raise ValueError(f"message {i}: unknown role {message['role']!r}; expected one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(message['content']).__name__}")
        turns.append((role, message["content"]))
    body = turns[1:] if turns[0][0] == "system" else turns
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            where = "the first message" if role == "system" else f"a {role} message"
            raise ValueError(
                f"{where} at position {i + len(turns) - len(body)} is out of order: after an optional "
                "system message, user and assistant messages must alternate, starting with user"
            )
    return turns


def _split(turns: list[Turn]) -> tuple[str | None, list[Turn]]:
    if turns[0][0] == "system":
        return turns[0][1], turns[1:]
    return None, turns


def _special_added_ids(tokenizer: Any) -> frozenset[int] | None:
    """Ids of a fast tokenizer's special added tokens (the strings ``split_special_tokens`` reads as text);
    None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return None
    return frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)


class ChatFormat:
    """Token-level TeleChat chat format bound to one tokenizer.

    ``generation_config`` (the model's generation_config.json as a dict) may give ``user_token_id``,
    ``bot_token_id`` and ``eos_token_id``; they win over the tokenizer's own ``<_user>``/``<_bot>``/
    ``<_end>`` (the 7B config uses 160130/160131/160133). ``content_markers`` says how marker
    strings typed inside a content are read (module doc).
    """

    def __init__(self, tokenizer: Any, generation_config: Mapping[str, Any] | None = None,
                 content_markers: ContentMarkers = "text") -> None:
        if content_markers not in get_args(ContentMarkers):
            raise ValueError(f"content_markers must be one of {get_args(ContentMarkers)}, got {content_markers!r}")
        gen = dict(generation_config or {})
        self.content_markers = content_markers
        self.tokenizer = tokenizer
        self._special_ids = _special_added_ids(tokenizer)
        self.user_id = self._id(gen.get("user_token_id"), USER)
        self.bot_id = self._id(gen.get("bot_token_id"), BOT)
        eos = gen.get("eos_token_id")
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        self.end_id = self._id(eos, END)
        self.system_id = self._id(None, SYSTEM, required=False)
        self._control_ids = {i for i in (self.user_id, self.bot_id, self.end_id, self.system_id) if i is not None}
        self._control_ids |= set(getattr(tokenizer, "all_special_ids", []))
        strings = sorted({tokenizer.convert_ids_to_tokens(i) for i in self._control_ids} - {None, ""}, key=len,
                         reverse=True)
        self._control_re = re.compile("(" + "|".join(map(re.escape, strings)) + ")") if strings else None

    def _id(self, configured: int | None, token: str, required: bool = True) -> int | None:
        if configured is not None:
            return int(configured)
        # convert_tokens_to_ids maps an unknown token to unk: accept the id only if it maps back.
        found = self.tokenizer.convert_tokens_to_ids(token)
        if found is not None and self.tokenizer.convert_ids_to_tokens(found) == token:
            return found
        if required:
            raise ValueError(f"the tokenizer has no {token} token and generation_config gives no id for it")
        return None

    # -- text pieces --------------------------------------------------------------------------

    def ids(self, text: str) -> list[int]:
        """Ids of one content string, no special tokens added; marker strings in it are read as
        ``content_markers`` says."""
        if not text:
            return []
        if self.content_markers == "control":
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        ids = self._plain(text)
        if self._control_ids.isdisjoint(ids) or self._control_re is None:
            return ids
        # The tokenizer still matched a marker (an added token not flagged special): encode each
        # marker occurrence one character at a time, which no multi-character marker can match.
        ids = []
        for part in self._control_re.split(text):
            if self._control_re.fullmatch(part):
                ids += [t for ch in part for t in self._plain(ch)]
            elif part:
                ids += self._plain(part)
        if not self._control_ids.isdisjoint(ids):
            raise ValueError("this tokenizer cannot encode the content as plain text (it keeps producing "
                             "dialog marker tokens)")
        return ids

    def _plain(self, text: str) -> list[int]:
        # A fast tokenizer's Rust backend, called directly, gives the same ids when it matched no special token
        # (the transformers wrapper costs ~40 % of a long history's encode, on every chat turn); else, or while
        # the backend is set to truncate or pad, the wrapper reads the special strings as text.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self._special_ids is not None and backend.truncation is None and backend.padding is None:
            ids = backend.encode(text, add_special_tokens=False).ids
            if self._special_ids.isdisjoint(ids):
                return ids
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def _system_ids(self, content: str | None) -> list[int]:
        if content is None:
            return []
        return ([self.system_id] if self.system_id is not None else []) + self.ids(content)

    def _user_ids(self, content: str) -> list[int]:
        return [self.user_id] + self.ids(content)

    def _answer_ids(self, content: str) -> list[int]:
        return self.ids(content) + [self.end_id]

    # -- public API ---------------------------------------------------------------------------

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an answer: ``<_end>`` (and the tokenizer's eos if it differs), as the official
        generation config stops on eos only."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return list(dict.fromkeys([self.end_id] + ([eos] if eos is not None else [])))

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None = None, *,
                      continue_final: bool = False, add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for the answer to the last (user) message.

        ``continue_final``: the last message is the assistant's unfinished answer, which the reply
        continues (``<_bot>`` and its content, no ``<_end>``: vLLM's ``continue_final_message``).
        ``add_generation_prompt`` False leaves the closing ``<_bot>`` after the last user message out.
        With ``max_tokens``, the prompt is made to fit: whole oldest history turns (user + assistant)
        are dropped first; if the system prompt plus the last user message still do not fit, the
        system prompt is dropped; if the last user message alone does not fit, its content is
        left-truncated (its newest tokens are kept).
        """
        turns = validate_messages(messages)
        partial: list[int] = []
        if continue_final:
            if turns[-1][0] != "assistant":
                raise ValueError("continue_final_message needs the last message to be the assistant's")
            partial = self.ids(turns[-1][1])
            turns = turns[:-1]
        elif turns[-1][0] != "user":
            raise ValueError("the last message must come from the user to build a prompt")
        bot = [self.bot_id] + partial if continue_final or add_generation_prompt else []
        system, body = _split(turns)
        history = [
            self._user_ids(body[i][1]) + [self.bot_id] + self._answer_ids(body[i + 1][1])
            for i in range(0, len(body) - 1, 2)
        ]
        question = self.ids(body[-1][1])
        head = self._system_ids(system)
        if max_tokens is None:
            return head + [t for turn in history for t in turn] + [self.user_id] + question + bot
        if max_tokens < 2 + len(bot):
            raise ValueError(f"max_tokens={max_tokens} cannot hold a prompt (<_user>, one token, <_bot>, the "
                             "answer to continue)")
        tail_len = len(question) + 1 + len(bot)
        total = len(head) + sum(map(len, history)) + tail_len
        while history and total > max_tokens:
            total -= len(history.pop(0))
        if total > max_tokens:
            head = []
        if tail_len > max_tokens:
            question = question[len(question) - (max_tokens - 1 - len(bot)) :]
        return head + [t for turn in history for t in turn] + [self.user_id] + question + bot

    def encode_turns(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], list[int]]]:
        """``(prompt_ids, answer_ids)`` per assistant answer, for SFT loss masking.

        The first prompt carries the system prompt; each prompt ends with ``<_bot>``; each answer
        ends with ``<_end>``. Concatenating all segments gives the whole conversation's ids. The
        conversation must end with an assistant message.
        """
        turns = validate_messages(messages)
        if turns[-1][0] != "assistant":
            raise ValueError("the last message must be an assistant answer to build training turns")
        system, body = _split(turns)
        segments = []
        for i in range(0, len(body), 2):
            prompt = self._user_ids(body[i][1]) + [self.bot_id]
            segments.append(((self._system_ids(system) if i == 0 else []) + prompt, self._answer_ids(body[i + 1][1])))
        return segments

    def markers(self) -> dict[str, str | None]:
        """Text of each marker token as the tokenizer spells it (``system`` is None without one)."""
        def text(i: int | None) -> str | None:
            return None if i is None else self.tokenizer.convert_ids_to_tokens(i)

        return {"user": text(self.user_id), "bot": text(self.bot_id), "end": text(self.end_id), "system": text(self.system_id)}

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               continue_final: bool = False) -> str:
        """Text form of the conversation, e.g. ``<_user>q1<_bot>a1<_end><_user>q2<_bot>``.

        ``add_generation_prompt`` appends ``<_bot>`` and needs the last message to be the user's;
        ``continue_final`` leaves the last (assistant) message open: no ``<_end>`` after it.
        """
        turns = validate_messages(messages)
        if continue_final and turns[-1][0] != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if add_generation_prompt and not continue_final and turns[-1][0] != "user":
            raise ValueError("the last message must come from the user to add a generation prompt")
        mark = self.markers()
        parts = []
        for i, (role, content) in enumerate(turns):
            if role == "system":
                parts.append((mark["system"] or "") + content)
            elif role == "user":
                parts.append(mark["user"] + content)
            else:
                parts.append(mark["bot"] + content + ("" if continue_final and i == len(turns) - 1 else mark["end"]))
        return "".join(parts) + (mark["bot"] if add_generation_prompt and not continue_final else "")


# ---------------------------------------------------------------------------------------------
# jinja template for tokenizer.apply_chat_template

def chat_template(user: str = USER, bot: str = BOT, end: str = END, system: str | None = SYSTEM) -> str:
    """Jinja chat template producing :meth:`ChatFormat.render` text for the given marker strings."""
    sys_prefix = system or ""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' and loop.first -%}" + sys_prefix + "{{ message['content'] }}"
        "{%- elif message['role'] == 'user' -%}" + user + "{{ message['content'] }}"
        "{%- elif message['role'] in ['assistant', 'bot'] -%}" + bot + "{{ message['content'] }}" + end + ""
        "{%- else -%}{{ raise_exception('unsupported role or position: ' ~ message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + bot + "{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template()
"""The TeleChat template with the standard markers and ``<_system>``."""


def install_chat_template(tokenizer: Any, generation_config: Mapping[str, Any] | None = None) -> str:
    """Set ``tokenizer.chat_template`` to the TeleChat format with this tokenizer's markers.

    Afterwards ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``
    gives the ids of :meth:`ChatFormat.encode_prompt` (no budget). Returns the template.
    """
    mark = ChatFormat(tokenizer, generation_config).markers()
    template = chat_template(mark["user"], mark["bot"], mark["end"], mark["system"])
    tokenizer.chat_template = template
    return template


# ---------------------------------------------------------------------------------------------
# official SFT data (`input` with markers + `output`)

_MARKER_SPLIT = re.compile(f"({re.escape(USER)}|{re.escape(BOT)})")


def messages_from_official(input: str, output: str | None = None) -> list[dict[str, str]]:
    """Parse an official SFT sample into messages.

    ``input`` is ``<_user>q1<_bot>a1<_user>q2…<_user>qn`` (the leading ``<_user>`` is optional; an
    answer may end with ``<_end>``); ``output`` (if given) is the answer to ``qn``. Raises
    ``ValueError`` when the markers do not alternate user/bot or the input does not end with a question.
    """
    if not isinstance(input, str) or (output is not None and not isinstance(output, str)):
        raise ValueError("input must be a string and output a string or None")
    parts = _MARKER_SPLIT.split(input)
    # parts = [text0, marker1, text1, marker2, text2, ...]; text0 is a question without its marker.
    if parts[0] == "" and len(parts) > 1 and parts[1] == USER:
        parts = parts[2:]
    elif parts[0] == "" and len(parts) > 1:
        raise ValueError("input starts with <_bot>: expected a user question first")
    messages = [{"role": "user", "content": parts[0]}]
    for k in range(1, len(parts), 2):
        marker, text = parts[k], parts[k + 1]
        expected = BOT if messages[-1]["role"] == "user" else USER
        if marker != expected:
            raise ValueError(f"marker mismatch in input: found {marker} where {expected} was expected (turn {len(messages)})")
        if marker == BOT:
            messages.append({"role": "assistant", "content": text.removesuffix(END)})
        else:
            messages.append({"role": "user", "content": text})
    if messages[-1]["role"] != "user":
        raise ValueError("input must end with a user question (<_user>q), the answer goes in output")
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages
