"""Record files → conversations, documents and token ids: the one reader behind fine-tuning data,
GPTQ calibration and ``telechat eval-ppl``.

A record file is jsonl (suffix ``.jsonl``/``.json``, or a first non-blank line that is a JSON
object) with one record per line, blank lines skipped:

- official SFT: ``{"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2"}`` (docs/fine-tune-and-quant.md); without
  ``output`` it is a prompt (e.g. the official ``test.jsonl``);
- OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``;
- document: ``{"text": "..."}`` or ``{"data": "..."}`` (TeleChat-PTD).

Anything else is plain text, read in blocks cut at line ends. Conversations become ids through
:class:`telechat.chat_format.ChatFormat` (the ids SFT and serving see); documents are tokenized
as they are and end with the tokenizer's eos. Every bad line is reported as
``file:line: reason`` (JSON errors with their column), the first :data:`MAX_REPORTED` of them and
the total count: a bad file is never read halfway silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from telechat.chat_format import ChatFormat, messages_from_official, validate_messages
from telechat.errors import UserError

MAX_REPORTED = 20
"""Bad lines listed in one error message; the total count is always given."""
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_BLOCK_CHARS = 1 << 16
"""Plain text is tokenized in blocks of about this many characters (cut at line ends), so a
reader that needs few tokens of a large file tokenizes only those."""


class RecordError(UserError, ValueError):
    """A record file cannot be used; the message lists ``file:line: reason`` for each bad line."""


@dataclass(frozen=True)
class Record:
    """One line of a record file: a conversation (``messages``) or a document (``text``)."""

    source: str  # "file:line", for error messages after parsing
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    def ids(self, chat: ChatFormat) -> list[int]:
        """Token ids as the model sees them: a conversation that ends with an answer gives every
        turn (prompt and answer ids), one that ends with a question gives its prompt; a document
        gives its tokens and eos."""
        try:
            if self.messages is None:
                tokenizer = chat.tokenizer
                eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
                return list(tokenizer.encode(self.text, add_special_tokens=False)) + eos
            if self.messages[-1]["role"] == "assistant":
                return [t for prompt, answer in chat.encode_turns(self.messages) for t in prompt + answer]
            return chat.encode_prompt(self.messages)
        except ValueError as e:  # the tokenizer lacks a marker, etc.
            raise RecordError(f"{self.source}: {e}") from e


def parse_record(text: str, *, prompts: bool = True, documents: bool = True) -> Record | None:
    """The record on one line (None for a blank line); ``ValueError`` with a readable reason.

    ``prompts=False`` refuses conversations without a final answer, ``documents=False`` refuses
    ``text``/``data`` records (fine-tuning needs answers to train on).
    """
    text = text.rstrip("\r\n")  # a JSON error at the end of the line is in this line, not the next
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        turns = validate_messages(obj["messages"])
        if turns[-1][0] == "system" or (not prompts and turns[-1][0] != "assistant"):
            raise ValueError("the last message must be the assistant answer to train on" if not prompts
                             else "the last message must be a user question or an assistant answer")
        return Record("", messages=[{"role": role, "content": content} for role, content in turns])
    if "input" in obj:
        if "output" not in obj and not prompts:
            raise ValueError("has 'input' but no 'output' (an inference prompt file such as test.jsonl?)")
        output = obj.get("output")
        if "output" in obj and (not isinstance(output, str) or not output):
            raise ValueError("'output' must be a non-empty string")
        return Record("", messages=messages_from_official(obj["input"], output))
    if documents and ("text" in obj or "data" in obj):
        doc = obj.get("text", obj.get("data"))
        if not isinstance(doc, str):
            raise ValueError(f"'text'/'data' must be a string, got {type(doc).__name__}")
        return Record("", text=doc)
    expected = "'input'+'output' (official) or 'messages' (OpenAI)" + (", 'text' or 'data'" if documents else "")
    raise ValueError(f"expected keys {expected}, got {sorted(obj)}")


def iter_records(path: str | Path, *, prompts: bool = True, documents: bool = True) -> Iterator[Record]:
    """Records of a jsonl file, lazily. At the first bad line nothing more is yielded; the rest of
    the file is checked too and :class:`RecordError` lists every bad line (up to :data:`MAX_REPORTED`)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file does not exist")
    errors: list[str] = []
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                record = parse_record(_decode(raw), prompts=prompts, documents=documents)
            except ValueError as e:
                count += 1
                if len(errors) < MAX_REPORTED:
                    errors.append(f"{path}:{lineno}: {e}")
                continue
            if record is not None and not errors:
                yield Record(f"{path}:{lineno}", record.messages, record.text)
    if errors:
        more = f"\n... and {count - len(errors)} more" if count > len(errors) else ""
        raise RecordError(f"{count} malformed line(s); fix them and run again:\n" + "\n".join(errors) + more)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None


def read_records(path: str | Path, *, prompts: bool = True, documents: bool = True) -> list[Record]:
    """Every record of a jsonl file; :class:`RecordError` when there is none or a line is bad."""
    records = list(iter_records(path, prompts=prompts, documents=documents))
    if not records:
        raise RecordError(f"{path}: no records (the file is empty)")
    return records


def is_jsonl(path: str | Path) -> bool:
    """Whether ``path`` holds records (by suffix, else by its first non-blank line) or plain text."""
    path = Path(path)
    if path.suffix in JSONL_SUFFIXES:
        return True
    with path.open(encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def iter_text_blocks(path: str | Path) -> Iterator[str]:
    """A plain text file in blocks of about :data:`TEXT_BLOCK_CHARS` characters, cut at line ends."""
    block: list[str] = []
    size = 0
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            block.append(line)
            size += len(line)
            if size >= TEXT_BLOCK_CHARS:
                yield "".join(block)
                block, size = [], 0
    if block:
        yield "".join(block)


def token_pieces(path: str | Path, chat: ChatFormat) -> Iterator[list[int]]:
    """Token ids of a record file, one list per record (jsonl) or per text block (plain text)."""
    if is_jsonl(path):
        for record in iter_records(path):
            yield record.ids(chat)
    else:
        for block in iter_text_blocks(path):
            yield list(chat.tokenizer.encode(block, add_special_tokens=False))
