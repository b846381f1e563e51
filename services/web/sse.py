"""Incremental Server-Sent Events reader (WHATWG HTML §9.2 "event stream" parsing).

Bytes arrive in arbitrary pieces: a `data:` line, a line ending, or a multi-byte UTF-8
character may be split across chunks. Lines are cut on *bytes* and decoded only once complete,
so a Chinese character split between two chunks is never decoded half-way (the official demo
decoded each 1024-byte chunk on its own and broke them).
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its `data:` lines joined by newlines."""

    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    """Feed raw bytes with `feed()`; call `close()` at end of stream for a last unterminated event."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume a chunk; return the events completed by it (possibly none)."""
        self._buf += chunk
        if not self._started:
            # The BOM may itself arrive split; decide only once three bytes are in.
            if len(self._buf) < len(_BOM) and _BOM.startswith(bytes(self._buf)):
                return []
            if self._buf.startswith(_BOM):
                del self._buf[: len(_BOM)]
            self._started = True
        return self._apply(self._take_lines(final=False))

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a trailing line and, leniently, a pending event.

        The spec discards an event not followed by a blank line; we deliver it instead, so a
        server that omits the last blank line still has its final chunk read.
        """
        events = self._apply(self._take_lines(final=True))
        if self._data:
            events.append(self._dispatch())
        return events

    def _take_lines(self, *, final: bool) -> list[str]:
        """Split complete lines off the buffer; CRLF, LF and lone CR all end a line."""
        lines: list[str] = []
        buf = self._buf
        start = 0
        i = 0
        n = len(buf)
        while i < n:
            byte = buf[i]
            if byte == 0x0A:  # LF
                lines.append(buf[start:i].decode("utf-8", "replace"))
                i += 1
                start = i
            elif byte == 0x0D:  # CR
                if i + 1 == n and not final:
                    break  # a CR at the chunk end may be the first half of a CRLF: wait
                lines.append(buf[start:i].decode("utf-8", "replace"))
                i += 2 if i + 1 < n and buf[i + 1] == 0x0A else 1
                start = i
            else:
                i += 1
        if final and start < n:
            lines.append(buf[start:].decode("utf-8", "replace"))
            start = n
        del buf[:start]
        return lines

    def _apply(self, lines: list[str]) -> list[SSEEvent]:
        events = []
        for line in lines:
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def _process_line(self, line: str) -> SSEEvent | None:
        """Apply one line to the pending event; a blank line dispatches it."""
        if line == "":
            if self._data:
                return self._dispatch()
            self._event = ""  # a blank line with no data only resets the event type
            return None
        if line.startswith(":"):
            return None  # comment (servers send these as keep-alives)
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        return None  # `retry` and unknown fields do not concern a one-shot reader

    def _dispatch(self) -> SSEEvent:
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id)
        self._data = []
        self._event = ""
        return event
