"""Incremental filtering of a Server-Sent Events stream (pure).

Theory of operation: an MCP server may answer a POST (or a GET, or a GET
that replays with ``Last-Event-ID``) with ``text/event-stream``, and a list
response in that stream must be filtered like a JSON one. The stream comes
in arbitrary chunks, so :class:`SseFilter` parses it incrementally with the
WHATWG event-stream rules (lines end in CRLF, LF or CR; ``:`` starts a
comment; ``field: value`` with one optional space; a blank line dispatches;
data lines are joined with "\\n"; one leading UTF-8 BOM is ignored) and
holds each event's raw bytes until its blank line has arrived.

A complete event goes on byte for byte, unless the ``transform`` returns a
replacement for its data: then only that event is re-serialised. Its other
lines (``id:``, ``event:``, ``retry:``, comments) are kept verbatim and in
place, its data lines are replaced by ``data:`` lines at the first data
line's position, with the event's own line ending. Blocks with no data line
dispatch nothing for a client, so the transform never sees them.

A CR at the end of a chunk ends a line, but an LF at the start of the next
chunk still belongs to it (CRLF split across chunks); ``_after_cr`` keeps
that straight so the LF is neither a second, blank line (which would
dispatch early) nor lost.

Fail closed, twice. An event bigger than ``max_event_bytes`` raises
:class:`SseEventTooLarge` rather than pass unfiltered: the caller closes the
stream. Any exception from the transform propagates the same way (it means
"not safe to pass on"). After an error the filter refuses more input. At
:meth:`close`, a trailing event that never got its blank line is not
dispatched by a conforming client, but a lenient one might act on it, so it
goes through the transform too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from proxy.agent.jsonrpc import IdKey
from proxy.agent.mcp import ListPolicy
from proxy.agent.mcp_answers import filter_responses

Transform = Callable[[str], str | None]

DEFAULT_MAX_EVENT_BYTES: Final = 8 << 20
_BOM: Final = b"\xef\xbb\xbf"
_LINE_BREAK = re.compile(rb"[\r\n]")
_SPLIT_LINES = re.compile(r"\r\n|\r|\n")


class SseError(Exception):
    """The stream cannot be filtered safely; the caller closes it."""


class SseEventTooLarge(SseError):
    pass


@dataclass(slots=True)
class _Line:
    start: int  # offsets from the start of the event's raw bytes
    content_end: int
    end: int  # after the line terminator
    is_data: bool


class SseFilter:
    """Feed response body chunks in, get the bytes to send on out."""

    def __init__(
        self, transform: Transform, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    ) -> None:
        self._transform = transform
        self._max = max_event_bytes
        self._buf = bytearray()  # held bytes; the current event starts at _start
        self._start = 0  # events before it were sent; dropped once per feed
        self._scan = 0  # everything before this offset is parsed
        self._searched = 0  # no line break in _buf[_scan:_searched]: don't rescan it
        self._lines: list[_Line] = []
        self._data: list[str] = []
        self._has_data = False
        self._at_start = True  # nothing seen yet: a BOM may still come
        self._after_cr = False  # the last byte parsed was a CR ending a line
        self._failed = False
        self._closed = False

    # -- public -----------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send on now (possibly empty); raises :class:`SseError`."""
        if self._failed:
            raise SseError("the stream already failed")
        if self._closed:
            raise SseError("the filter is closed")
        out = bytearray()
        try:
            self._feed(chunk, out)
        except BaseException:
            self._failed = True
            raise
        return bytes(out)

    def close(self) -> bytes:
        """The end of the stream: whatever is held, filtered as far as possible."""
        if self._failed or self._closed:
            self._closed = True
            return b""
        self._closed = True
        if not self._buf:
            return b""
        try:
            if self._scan < len(self._buf):  # an unterminated last line
                self._line(self._scan, len(self._buf), len(self._buf))
            return self._emit(bytes(self._buf))
        except BaseException:
            self._failed = True
            raise

    # -- parsing ------------------------------------------------------------

    def _feed(self, chunk: bytes, out: bytearray) -> None:
        if not chunk:
            return
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":  # the second half of a CRLF
                chunk = chunk[1:]
                if self._buf:
                    self._buf += b"\n"
                    self._scan += 1
                    self._lines[-1].end += 1
                else:  # the CR was a blank line that already went out
                    out += b"\n"
        self._buf += chunk
        if self._at_start:
            if len(self._buf) < len(_BOM) and _BOM.startswith(bytes(self._buf)):
                return  # could still be a BOM
            self._at_start = False
            if self._buf.startswith(_BOM):
                self._scan = len(_BOM)  # raw bytes of the first event, not a field
        while True:
            match = _LINE_BREAK.search(self._buf, max(self._scan, self._searched))
            if match is None:
                self._searched = len(self._buf)  # a long line in small chunks stays linear
                break
            pos = match.start()
            if self._buf[pos] == 0x0D:
                if pos + 1 < len(self._buf):
                    end = pos + 2 if self._buf[pos + 1] == 0x0A else pos + 1
                else:
                    end = pos + 1
                    self._after_cr = True
            else:
                end = pos + 1
            if pos == self._scan:  # a blank line: dispatch
                self._check_size(end - self._start)
                out += self._emit(bytes(self._buf[self._start : end]))
                self._start = self._scan = end
                continue
            self._line(self._scan, pos, end)
            self._scan = end
        if self._start:  # one move per chunk, not one per event
            del self._buf[: self._start]
            self._scan -= self._start
            self._searched = max(0, self._searched - self._start)
            self._start = 0
        self._check_size(len(self._buf))

    def _check_size(self, size: int) -> None:
        if size > self._max:
            raise SseEventTooLarge(f"an SSE event over {self._max} bytes")

    def _line(self, start: int, content_end: int, end: int) -> None:
        line = bytes(self._buf[start:content_end])
        is_data = False
        if not line.startswith(b":"):
            name, colon, value = line.partition(b":")
            if colon and value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                is_data = True
                self._has_data = True
                # Lines split on ASCII CR/LF only, so no UTF-8 sequence spans
                # two lines and decoding per line equals decoding the stream.
                self._data.append(value.decode("utf-8", "replace"))
        base = self._start
        self._lines.append(_Line(start - base, content_end - base, end - base, is_data))

    # -- dispatching ----------------------------------------------------------

    def _emit(self, raw: bytes) -> bytes:
        lines, data, has_data = self._lines, self._data, self._has_data
        self._lines, self._data, self._has_data = [], [], False
        if not has_data:  # nothing is dispatched for a client: pass it on
            return raw
        replacement = self._transform("\n".join(data))
        if replacement is None:
            return raw
        first = next(line for line in lines if line.is_data)
        eol = raw[first.content_end : first.end] or b"\n"
        new_data = b"".join(
            b"data: " + part.encode("utf-8") + eol for part in _SPLIT_LINES.split(replacement)
        )
        out = bytearray(raw[: lines[0].start])  # a BOM, if any
        for line in lines:
            if line is first:
                out += new_data
            elif not line.is_data:
                out += raw[line.start : line.end]
        last_end = lines[-1].end
        out += raw[last_end:]  # the blank line that dispatched (absent at close)
        return bytes(out)


def make_list_transform(
    pending: Mapping[IdKey, str], policy: ListPolicy, version: str
) -> Transform:
    """A transform that filters MCP list responses in event data.

    Events answering a pending list request are filtered; so is any event
    whose result has a list's shape (replays after ``Last-Event-ID`` may
    answer requests the caller no longer tracks). Everything else: None.
    ``pending`` is read at each event, so the caller may keep updating it.
    Raises :class:`~proxy.agent.mcp.UnfilterableResponse` for event data we
    must not pass on (see :func:`~proxy.agent.mcp_answers.filter_responses`).
    """

    def transform(data: str) -> str | None:
        filtered = filter_responses(data, pending, policy, version, infer=True)
        return None if filtered is None else filtered.decode("utf-8")

    return transform
