"""The oracle of the llhttp differential test: a MessageParser on h11 with
the strict checks the sidecar applied before llhttp (proxy/http/conn.py and
proxy/http/framing.py as of the parser seam), written out here so the
oracle does not move when the production code does.

Requests: h11 SERVER role, and before h11 reads a head: no bare LF or CR,
no obs-fold, no field without a colon, one Content-Length without a list,
not both CL and TE, head size and field count limits; inside a chunked body
a bare LF is a framing error. Responses: h11 CLIENT role alone (the sidecar
never checked upstream bytes beyond h11). Errors become ParseError with
h11's status hint (requests) or 502 (responses).
"""

from __future__ import annotations

import re

import h11

from proxy.http.wire import (
    NEED_DATA,
    Body,
    End,
    Event,
    Framing,
    Head,
    NeedData,
    ParseError,
    ParserLimits,
    Role,
)

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


def _check_partial(buffer: bytes, limits: ParserLimits) -> None:
    if _BARE_LF.search(buffer):
        raise ParseError(400, "bad_request", "bare LF in request head")
    if len(buffer) > limits.max_header_bytes:
        raise ParseError(431, "header_too_large", "request head too large")


def _check_head(head: bytes, limits: ParserLimits) -> None:
    if len(head) > limits.max_header_bytes:
        raise ParseError(431, "header_too_large", "request head too large")
    body = head[:-4]
    if _BARE_LF.search(body) or _BARE_CR.search(body):
        raise ParseError(400, "bad_request", "bare LF or CR in request head")
    fields = body.split(b"\r\n")[1:]
    if len(fields) > limits.max_headers:
        raise ParseError(431, "header_too_large", "too many fields")
    lengths = 0
    te = False
    for line in fields:
        if line[:1] in (b" ", b"\t"):
            raise ParseError(400, "bad_request", "obs-fold")
        name, sep, value = line.partition(b":")
        if not sep:
            raise ParseError(400, "bad_request", "field without ':'")
        lowered = name.lower()
        if lowered == b"content-length":
            lengths += 1
            if b"," in value:
                raise ParseError(400, "bad_request", "Content-Length list")
        elif lowered == b"transfer-encoding":
            te = True
    if lengths > 1:
        raise ParseError(400, "bad_request", "duplicated Content-Length")
    if lengths and te:
        raise ParseError(400, "bad_request", "CL and TE")


def _tokens(headers: h11._headers.Headers, name: bytes) -> list[bytes]:
    out = []
    for found, value in headers:
        if found == name:
            out += [t.strip() for t in value.lower().split(b",") if t.strip()]
    return out


class H11Oracle:
    def __init__(self, role: Role, limits: ParserLimits | None = None) -> None:
        self.role: Role = role
        self.limits = limits or ParserLimits()
        self.conn = h11.Connection(
            h11.SERVER if role == "request" else h11.CLIENT,
            max_incomplete_event_size=self.limits.max_header_bytes + 1024,
        )
        self.head_request = False
        self.done = False
        self.error: ParseError | None = None
        self.current: Head | None = None

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def for_head_request(self) -> None:
        self.head_request = True

    @property
    def buffered(self) -> bytes:
        return bytes(self.conn.trailing_data[0])

    def start_next_cycle(self) -> None:
        if self.role == "request":
            self.conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            self.conn.send(h11.EndOfMessage())
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError as exc:
            raise RuntimeError(str(exc)) from exc
        self.done = False
        self.head_request = False
        self.current = None

    def next_event(self) -> Event | NeedData:
        if self.error is not None:
            raise self.error
        try:
            return self._next()
        except ParseError as exc:
            self.error = exc
            raise
        except h11.RemoteProtocolError as exc:
            if self.role == "response":
                self.error = ParseError(502, "bad_upstream_response", str(exc))
            else:
                hint = exc.error_status_hint
                self.error = ParseError(hint, "h11", str(exc))
            raise self.error from exc

    def _next(self) -> Event | NeedData:
        conn = self.conn
        if self.done:
            return NEED_DATA
        if self.current is not None and self.current.status == 101:
            self.done = True
            return End([])
        if self.role == "response" and conn.our_state is h11.IDLE:
            method = b"HEAD" if self.head_request else b"GET"
            # Proposing an upgrade lets h11 accept a 101 (the exchange, not
            # the parser, knows whether one was asked for).
            fields = [(b"host", b"o"), (b"connection", b"upgrade"), (b"upgrade", b"x")]
            conn.send(h11.Request(method=method, target=b"/", headers=fields))
            conn.send(h11.EndOfMessage())
        if self.role == "request" and conn.their_state is h11.IDLE:
            pending, closed = conn.trailing_data
            if pending:
                end = bytes(pending).find(b"\r\n\r\n")
                if end >= 0:
                    _check_head(bytes(pending[: end + 4]), self.limits)
                else:
                    _check_partial(bytes(pending), self.limits)
            elif closed:
                return NEED_DATA
        event = conn.next_event()
        if event is h11.NEED_DATA:
            pending = bytes(conn.trailing_data[0])
            if self.role == "request" and conn.their_state is h11.SEND_BODY and pending:
                lf = pending.find(b"\n")
                if lf == 0 or (lf > 0 and pending[lf - 1 : lf] != b"\r"):
                    raise ParseError(400, "bad_request", "bad chunk framing")
            return NEED_DATA
        if event is h11.PAUSED:
            return NEED_DATA
        if isinstance(event, (h11.Request, h11.Response, h11.InformationalResponse)):
            head = self._head(event)
            self.current = head
            return head
        if isinstance(event, h11.Data):
            return Body(bytes(event.data))
        if isinstance(event, h11.EndOfMessage):
            self.done = True
            return End(list(event.headers.raw_items()))
        if isinstance(event, h11.ConnectionClosed):
            if self.current is not None and not self.done:
                raise ParseError(400, "bad_request", "closed inside a message")
            return NEED_DATA
        raise AssertionError(event)

    def _head(self, event: h11.Request | h11.Response | h11.InformationalResponse) -> Head:
        headers = list(event.headers.raw_items())
        lowered = [n.lower() for n, _ in headers]
        te = _tokens(event.headers, b"transfer-encoding")
        lengths = [v for n, v in event.headers if n == b"content-length"]
        connection = _tokens(event.headers, b"connection")
        head = Head(version=event.http_version, headers=headers, framing=Framing.NONE)
        head.names = frozenset(lowered)
        head.keep_alive = event.http_version == b"1.1" and b"close" not in connection
        status = 0
        if isinstance(event, h11.Request):
            head.method = event.method
            head.target = event.target
            head.upgrade = event.method == b"CONNECT" or (
                b"upgrade" in connection and b"upgrade" in lowered
            )
        else:
            status = head.status = event.status_code
            head.reason = bytes(event.reason)
            head.upgrade = status == 101
        no_body = status != 0 and (status < 200 or status in (204, 304) or self.head_request)
        if no_body:
            pass
        elif te:
            head.framing = Framing.CHUNKED
        elif lengths:
            head.content_length = int(lengths[0])
            head.framing = Framing.LENGTH if head.content_length else Framing.NONE
        elif status:
            head.framing = Framing.UNTIL_CLOSE
            head.keep_alive = False
        return head
