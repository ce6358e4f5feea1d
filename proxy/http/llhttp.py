"""The hot-path HTTP/1.1 parser: a :class:`~proxy.http.wire.MessageParser`
on httptools (llhttp, Node.js's parser). Pure: bytes in, events out.

Theory of operation: llhttp validates every byte (token and value
characters, CRLF line endings, no obs-fold, no space before the colon,
chunk framing, Content-Length syntax, CL+TE), but it consumes whatever it
is given and has no way to stop at a message boundary. So this wrapper
decides the boundaries itself and feeds llhttp exactly one message at a
time: the head ends at the first CRLFCRLF (llhttp rejects any bare CR or LF
that could make another parser see a different end), a Content-Length body
is that many bytes, and a chunked body is walked chunk-size line by
chunk-size line by :class:`Chunks` while llhttp checks the same bytes.
Bytes past the current message stay raw in ``_buf`` until
``start_next_cycle()`` (pipelining), and are the start of the other
protocol after an upgrade (``buffered``).

Where llhttp is more lenient than h11 plus today's strict checks (the
oracle of tests/unit/test_llhttp_differential.py), the wrapper closes the
gap on the raw head, which it always holds whole: the request or status
line must match h11's grammar exactly (single spaces, no leading empty
line, a clean reason phrase), HTTP/1.1 requests need exactly one Host,
Transfer-Encoding must be exactly ``chunked`` (else 501), Content-Length
may appear once (list or repeated: 400), heads and field counts are capped
(431), and Connection is read as h11 reads it (HTTP/1.0 never keeps alive).

Per message the wrapper allocates only what it hands out (the Head, its
header list, Body and End events); the llhttp parser, the event queue and
the callbacks are reused for the life of the connection.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

import httptools

from proxy.http.llhttp_head import HeadRefused, request_head, response_head, trailer_field
from proxy.http.llhttp_parts import Callbacks, Chunks
from proxy.http.wire import (
    NEED_DATA,
    Body,
    End,
    Event,
    Framing,
    Head,
    Header,
    NeedData,
    ParseError,
    ParserLimits,
    Role,
)

_FIELD_LINE: Final = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")

# Message states.
_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE, _UPGRADED, _CLOSED = range(7)


class LlhttpParser:
    """One direction of one connection (see :class:`~proxy.http.wire.MessageParser`).

    ``expects_continue`` is true from a request head carrying
    ``Expect: 100-continue`` (HTTP/1.1) until its first body byte or its end,
    the window in which the exchange may answer ``100 Continue``.
    """

    __slots__ = ("__weakref__", "_buf", "_bypassed", "_chunks", "_eof", "_error", "_events",
                 "_framing", "_head", "_head_request", "_headers", "_in_trailers", "_limits",
                 "_llhttp", "_message_complete", "_pos", "_scan", "_state", "_trailers",
                 "expects_continue", "role")  # fmt: skip

    def __init__(self, role: Role, limits: ParserLimits | None = None) -> None:
        self.role: Role = role
        self._limits = limits or ParserLimits()
        self._llhttp = self._new_llhttp()
        self._buf = b""  # raw bytes not yet consumed, from offset _pos
        self._pos = 0
        self._scan = 0  # how far into the current head we looked for CRLFCRLF
        # Events made but not yet handed out (one popleft each, no bookkeeping).
        self._events: deque[Event] = deque()
        self._error: ParseError | None = None
        self._state = _HEAD
        self._eof = False
        self._headers: list[Header] = []
        self._trailers: list[Header] = []
        self._in_trailers = False
        self._message_complete = False
        self._head: Head | None = None
        self._head_request = False
        self._framing = Framing.NONE
        self._chunks = Chunks()
        self._bypassed = False  # this Content-Length body went around us (skip_body)
        self.expects_continue = False

    def _new_llhttp(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        if self.role == "request":
            return httptools.HttpRequestParser(Callbacks(self))
        return httptools.HttpResponseParser(Callbacks(self))

    # -- the MessageParser interface --------------------------------------

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("feed() after end of input")
        if self._pos >= len(self._buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        else:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0

    def next_event(self) -> Event | NeedData:
        events = self._events
        if events:
            return events.popleft()
        if self._error is not None:
            raise self._error
        try:
            self._advance()
        except ParseError as exc:
            self._error = exc
            self._state = _CLOSED
        if events:
            return events.popleft()
        if self._error is not None:
            raise self._error
        return NEED_DATA

    def start_next_cycle(self) -> None:
        if self._state == _UPGRADED:
            self._state = _HEAD  # the upgrade was declined: HTTP goes on
        elif self._state != _DONE:
            raise RuntimeError("start_next_cycle() before the end of the message")
        elif self._head is not None and not self._head.keep_alive:
            raise RuntimeError("the message did not allow another on this connection")
        else:
            self._state = _HEAD
        self._head = None
        self._head_request = False

    def for_head_request(self) -> None:
        if self.role != "response":
            raise RuntimeError("for_head_request() on a request parser")
        self._head_request = True

    @property
    def buffered(self) -> bytes:
        return bytes(self._buf[self._pos :])

    def body_unbuffered(self) -> int:
        """Bytes of the current Content-Length body not yet fed, when all
        that was fed is consumed and handed out; else 0."""
        if self._state != _LENGTH or self._events or self._pos < len(self._buf) or self._eof:
            return 0
        return self._chunks.left

    def skip_body(self, count: int) -> None:
        """``count`` bytes of the current Content-Length body were moved
        without passing through the parser (a reactor sent them on). Body
        bytes of a known length are opaque to llhttp too; it is replaced at
        the body's end, as it never saw these."""
        if count > self.body_unbuffered():
            raise RuntimeError("skip_body() past the unbuffered rest of the body")
        if count:
            self._chunks.left -= count
            self._bypassed = True

    # -- driving llhttp one message at a time -----------------------------

    def _advance(self) -> None:
        while True:
            state = self._state
            if state == _HEAD:
                if not self._head_step():
                    return
            elif state == _LENGTH:
                if not self._length_step():
                    return
            elif state == _CHUNKED:
                if not self._chunked_step():
                    return
            elif state == _UNTIL_CLOSE:
                self._until_close_step()
                return
            else:
                return

    def _feed_llhttp(self, start: int, end: int) -> None:
        buf = self._buf
        chunk = buf if start == 0 and end == len(buf) else memoryview(buf)[start:end]
        try:
            self._llhttp.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            # Only a head ends in an upgrade, and we fed no byte past it.
            pass
        except httptools.HttpParserError as exc:
            if str(exc) == "Pause on CONNECT/Upgrade":
                # An upgrade httptools did not resume (a 101 with framing
                # fields); HTTP, if it goes on, needs a fresh llhttp.
                self._llhttp = self._new_llhttp()
                return
            raise self._refuse_llhttp(str(exc)) from None

    def _refuse(self, status: int, reason: str, message: str) -> ParseError:
        if self.role == "response":
            return ParseError(502, "bad_upstream_response", message)
        return ParseError(status, reason, message)

    def _refuse_llhttp(self, text: str) -> ParseError:
        if "Transfer-Encoding" in text and "Content-Length" not in text:
            return self._refuse(501, "unsupported_transfer_encoding", text)
        return self._refuse(400, "bad_request", text)

    def _head_step(self) -> bool:
        buf, pos = self._buf, self._pos
        size = len(buf) - pos
        limit = self._limits.max_header_bytes
        if size == 0:
            if self._eof and self._head is not None and self._head.status // 100 == 1:
                raise self._refuse(400, "bad_request", "connection closed after a 1xx response")
            return False
        if self._scan == 0:
            if buf[pos] in (13, 10):
                raise self._refuse(400, "bad_request", "empty line before the message head")
            self._trailers = []
            self._in_trailers = False
            self._message_complete = False
        end = buf.find(b"\r\n\r\n", max(pos, pos + self._scan - 3))
        if end < 0:
            if size > limit:
                raise self._refuse(431, "header_too_large", f"message head over {limit} bytes")
            # Not all here yet; llhttp sees it now so a bare LF fails at once.
            self._feed_llhttp(pos + self._scan, len(buf))
            self._scan = size
            if self._eof:
                raise self._refuse(400, "bad_request", "connection closed inside a message head")
            return False
        head_end = end + 4
        if head_end - pos > limit:
            raise self._refuse(431, "header_too_large", f"message head over {limit} bytes")
        self._feed_llhttp(pos + self._scan, head_end)
        if not self._in_trailers:
            raise self._refuse(400, "bad_request", "malformed message head")
        self._scan = 0
        self._pos = head_end
        line_end = buf.find(b"\r\n", pos)
        line = buf[pos:line_end]
        # llhttp has checked every field line (a token, a colon, a value of
        # field characters, CRLF): each one matches, in order; the value
        # without its surrounding blanks, as llhttp and h11 give it.
        self._headers = _FIELD_LINE.findall(buf, line_end + 2, end + 2)
        if len(self._headers) > self._limits.max_headers:
            raise self._refuse(
                431, "header_too_large", f"more than {self._limits.max_headers} header fields"
            )
        try:
            if self.role == "request":
                head, self.expects_continue = request_head(line, self._headers)
            else:
                head = response_head(line, self._headers, self._head_request)
        except HeadRefused as exc:
            raise self._refuse(exc.status, exc.reason, exc.message) from None
        self._head = head
        self._events.append(head)
        return self._after_head(head)

    def _after_head(self, head: Head) -> bool:
        """Set up the body state; True to keep going in ``_advance``."""
        framing = head.framing
        if self.role == "response":
            if head.status == 101:
                head.upgrade = True
                self._end_message(_UPGRADED)
                return False
            if head.status < 200:
                # Informational: the final head follows in the same cycle.
                if not self._message_complete:
                    raise self._refuse(400, "bad_request", "informational response with a body")
                self._message_complete = False
                return True
            if self._head_request:
                # llhttp expects the body the fields describe; a HEAD answer
                # has none. A fresh llhttp is the only way to tell it (rare).
                self._llhttp = self._new_llhttp()
                self._end_message(_DONE)
                return False
        if framing is Framing.NONE:
            if not self._message_complete:
                # llhttp reads a body where h11 reads none: refuse the doubt.
                raise self._refuse(400, "bad_request", "message framing is ambiguous")
            self._end_message(_UPGRADED if head.upgrade else _DONE)
            return False
        if framing is Framing.LENGTH:
            self._chunks.left = head.content_length or 0
            self._state = _LENGTH
        elif framing is Framing.CHUNKED:
            self._chunks.reset()
            self._state = _CHUNKED
        else:
            self._state = _UNTIL_CLOSE
        return True

    def _end_message(self, state: int) -> None:
        self.expects_continue = False
        self._events.append(End(self._trailers))
        self._state = state

    def _length_step(self) -> bool:
        buf, pos = self._buf, self._pos
        take = min(self._chunks.left, len(buf) - pos)
        if take:
            if self._bypassed:  # llhttp missed the skipped part: it counts no more
                self._events.append(Body(buf[pos : pos + take]))
            else:
                self._feed_llhttp(pos, pos + take)
            self._pos = pos + take
            self._chunks.left -= take
        if self._chunks.left == 0:
            if self._bypassed:
                self._bypassed = False
                self._llhttp = self._new_llhttp()  # it still waits for the skipped bytes
                self._message_complete = True
            self._finish_body()
            return False
        if self._eof:
            raise self._refuse(400, "bad_request", "connection closed inside a message body")
        return False

    def _finish_body(self) -> None:
        if not self._message_complete:
            raise self._refuse(400, "bad_request", "message body did not end where framed")
        head = self._head
        self._end_message(_UPGRADED if head is not None and head.upgrade else _DONE)

    def _until_close_step(self) -> None:
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            self._feed_llhttp(pos, len(buf))
            self._pos = len(buf)
        if self._eof:
            self._end_message(_CLOSED)

    def _chunked_step(self) -> bool:
        """Walk chunk framing over what is buffered; True when the body ended."""
        chunks = self._chunks
        buf = self._buf
        limits = self._limits
        while True:
            pos = self._pos
            if pos >= len(buf):
                if self._eof:
                    raise self._refuse(400, "bad_request", "connection closed inside a body")
                return False
            if chunks.state in (Chunks.DATA, Chunks.DATA_CRLF):
                # Chunk data, then the CRLF after it (llhttp checks it is one).
                take = min(chunks.left, len(buf) - pos)
                self._feed_llhttp(pos, pos + take)
                self._pos = pos + take
                chunks.left -= take
                if chunks.left == 0:
                    data = chunks.state == Chunks.DATA
                    chunks.state = Chunks.DATA_CRLF if data else Chunks.SIZE
                    chunks.left = 2 if data else 0
                continue
            lf = buf.find(b"\n", pos)
            end = len(buf) if lf < 0 else lf + 1
            # Trailer fields are read here, not by llhttp: it applies head
            # rules to them (Content-Length with Transfer-Encoding is an
            # error there) where h11 takes them as fields the relay filters.
            trailer = chunks.state == Chunks.TRAILER
            if not trailer:
                self._feed_llhttp(pos, end)
            self._pos = end
            line = chunks.line + buf[pos:end] if chunks.line else buf[pos:end]
            if lf < 0:
                if len(line) > limits.max_header_bytes:
                    raise self._refuse(431, "header_too_large", "chunk line too long")
                chunks.line = line
                continue
            chunks.line = b""
            if chunks.state == Chunks.SIZE:
                size = line.split(b";", 1)[0].rstrip(b"\r\n")
                try:
                    chunks.left = int(size, 16)
                except ValueError:
                    raise self._refuse(400, "bad_request", "bad chunk size") from None
                if chunks.left:
                    chunks.state = Chunks.DATA
                    self.expects_continue = False
                else:
                    chunks.state = Chunks.TRAILER
                continue
            # A trailer line; the empty one ends the body.
            chunks.trailer_bytes += len(line)
            if chunks.trailer_bytes > limits.max_header_bytes:
                raise self._refuse(431, "header_too_large", "trailer section too large")
            if len(self._trailers) > limits.max_headers:
                raise self._refuse(431, "header_too_large", "too many trailer fields")
            if line == b"\r\n":
                self._feed_llhttp(end - 2, end)
                self._finish_body()
                return False
            try:
                self._trailers.append(trailer_field(line))
            except HeadRefused as exc:
                raise self._refuse(exc.status, exc.reason, exc.message) from None
