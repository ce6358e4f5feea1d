"""The h11-backed :class:`~proxy.http.wire.MessageParser` (pure, no I/O).

Theory of operation. h11 is a full connection state machine for *both*
directions; a parser here reads only one. So each parser drives h11's other
side itself with throw-away messages: a request parser (h11 SERVER) answers
every request it has read with a discarded empty response when the caller
starts the next cycle, and a response parser (h11 CLIENT) sends a discarded
request (``GET``, or ``HEAD`` after :meth:`H11Parser.for_head_request`)
before it reads each response. h11 then frames bodies and finds message
ends exactly as it would for a live connection.

h11 is lenient where a proxy must not be (bare LF, obs-fold, merged
duplicate Content-Length): a request head is checked raw by
:mod:`proxy.http.framing` before h11 reads it. Its end is found by a
:class:`~proxy.http.framing.HeadScanner`, which looks at each byte a bounded
number of times however the head is split into pieces. Inside a chunked
request body, a bare LF where h11 waits for a line is refused at once
instead of being waited on. Response heads are not held to the raw checks:
origins are ours to configure, and the framing h11 reads is the framing we
re-serialise.

Every refusal is a :class:`~proxy.http.wire.ParseError` (the peer did it);
anything else escaping from here is a bug of ours.
"""

from __future__ import annotations

import h11

from proxy.http.framing import HeadError, HeadScanner, check_chunked_buffer, check_head
from proxy.http.headers import connection_tokens
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

_NO_BODY_STATUS = frozenset({204, 304})
_DEFAULT_LIMITS = ParserLimits()


def _framing(
    headers: list[tuple[bytes, bytes]], *, response_status: int = 0, head_request: bool = False
) -> tuple[Framing, int | None]:
    if response_status and (
        response_status < 200 or response_status in _NO_BODY_STATUS or head_request
    ):
        return Framing.NONE, None
    length: int | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return Framing.CHUNKED, None
        if lowered == b"content-length":
            length = int(value)
    if length is not None:
        return (Framing.LENGTH, length) if length else (Framing.NONE, 0)
    return (Framing.UNTIL_CLOSE, None) if response_status else (Framing.NONE, None)


class H11Parser:
    """One direction of one connection, on h11 (see the module docstring)."""

    def __init__(self, role: Role, limits: ParserLimits = _DEFAULT_LIMITS) -> None:
        self.role: Role = role
        self.limits = limits
        self._conn = h11.Connection(
            h11.SERVER if role == "request" else h11.CLIENT,
            max_incomplete_event_size=limits.max_header_bytes + 1024,
        )
        self._scanner: HeadScanner | None = HeadScanner(limits.max_header_bytes)
        self._head_checked = role == "response"
        self._head_request = False
        self._request_sent = False  # response role: the throw-away request of this cycle
        self._done = False  # End returned; NEED_DATA until start_next_cycle
        self._dead = False
        self._eof = False

    # -- MessageParser ------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._dead:
            return
        if not data:
            self._eof = True
        elif self._scanner is not None and self._scanner.end is None:
            try:
                self._scanner.feed(data)
            except HeadError as exc:
                self._fail(exc.status, exc.reason, exc.message)
        self._conn.receive_data(data)

    def next_event(self) -> Event | NeedData:
        if self._dead:
            raise ParseError(400, "bad_request", "the parser already refused this input")
        if self._done:
            return NEED_DATA
        if self.role == "request" and not self._head_checked and not self._check_request_head():
            return NEED_DATA
        if self.role == "response" and not self._request_sent:
            self._send_placeholder_request()
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._refused(exc) from exc
        return self._translate(event)

    def start_next_cycle(self) -> None:
        conn = self._conn
        if self.role == "request" and conn.our_state is h11.SEND_RESPONSE:
            # Our side of h11's state machine: an empty answer, discarded.
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError as exc:
            # Connection: close (or HTTP/1.0) on either message: no next cycle.
            self._dead = True
            raise ParseError(
                400, "bad_request", "the connection cannot carry another message"
            ) from exc
        self._done = False
        self._head_request = False
        self._request_sent = False
        if self.role == "request":
            self._head_checked = False
            self._scanner = HeadScanner(self.limits.max_header_bytes)
            pending = conn.trailing_data[0]
            if pending:  # pipelined bytes: copied out once, scanned once
                try:
                    self._scanner.feed(pending)
                except HeadError as exc:
                    self._fail(exc.status, exc.reason, exc.message)

    def for_head_request(self) -> None:
        self._head_request = True

    @property
    def buffered(self) -> bytes:
        return bytes(self._conn.trailing_data[0])

    def body_unbuffered(self) -> int:
        return 0  # h11 counts every body byte itself: nothing may go around it

    def skip_body(self, count: int) -> None:
        if count:
            raise RuntimeError("skip_body() on the h11 parser")

    # -- inside -------------------------------------------------------------

    def _fail(self, status: int, reason: str, message: str) -> None:
        self._dead = True
        raise ParseError(status, reason, message)

    def _refused(self, exc: h11.RemoteProtocolError) -> ParseError:
        self._dead = True
        if self.role == "response":
            return ParseError(502, "bad_upstream_response", str(exc))
        status = exc.error_status_hint
        reason = "unsupported_transfer_encoding" if status == 501 else "bad_request"
        return ParseError(status, reason, str(exc))

    def _check_request_head(self) -> bool:
        """Raw checks on a complete head; False while it is incomplete."""
        scanner = self._scanner
        assert scanner is not None
        if scanner.end is None:
            if self._eof and scanner.scanned:
                self._fail(400, "bad_request", "connection closed inside a request head")
            return False
        try:
            check_head(scanner.head, self.limits.max_header_bytes, self.limits.max_headers)
        except HeadError as exc:
            self._fail(exc.status, exc.reason, exc.message)
        self._head_checked = True
        self._scanner = None
        return True

    def _send_placeholder_request(self) -> None:
        method = b"HEAD" if self._head_request else b"GET"
        # It always proposes an upgrade so that h11 takes a 101 as the end of
        # HTTP (the caller tunnels ``buffered``); any other answer declines it.
        headers = [(b"host", b"-"), (b"connection", b"upgrade"), (b"upgrade", b"-")]
        self._conn.send(h11.Request(method=method, target=b"/", headers=headers))
        self._conn.send(h11.EndOfMessage())
        self._request_sent = True

    def _translate(self, event: object) -> Event | NeedData:
        if event is h11.NEED_DATA or event is h11.PAUSED:
            if self.role == "request" and self._conn.their_state is h11.SEND_BODY:
                try:
                    check_chunked_buffer(self._conn.trailing_data[0])
                except HeadError as exc:
                    self._fail(exc.status, exc.reason, exc.message)
            return NEED_DATA
        if isinstance(event, h11.Request):
            return self._head(
                event.headers, event.http_version, method=event.method, target=event.target
            )
        if isinstance(event, h11.InformationalResponse | h11.Response):
            return self._head(
                event.headers, event.http_version, status=event.status_code, reason=event.reason
            )
        if isinstance(event, h11.Data):
            return Body(bytes(event.data))
        if isinstance(event, h11.EndOfMessage):
            self._done = True
            return End(trailers=list(event.headers.raw_items()))
        if isinstance(event, h11.ConnectionClosed):
            if self.role == "request":
                return NEED_DATA  # a clean close between requests: the caller fed b""
            self._fail(502, "upstream_closed", "upstream closed the connection")
        raise AssertionError(f"unexpected h11 event {event!r}")

    def _head(
        self,
        headers: h11._headers.Headers,  # h11 exports no name for its header list
        version: bytes,
        *,
        method: bytes = b"",
        target: bytes = b"",
        status: int = 0,
        reason: bytes = b"",
    ) -> Head:
        raw = list(headers.raw_items())  # names as the peer spelled them
        names = frozenset(n for n, _ in headers)  # h11's own view is lower-cased
        tokens = connection_tokens(headers)
        framing, length = _framing(
            raw, response_status=status, head_request=self._head_request and bool(status)
        )
        keep_alive = version == b"1.1" and b"close" not in tokens
        upgrade = method == b"CONNECT" or (b"upgrade" in tokens and b"upgrade" in names)
        return Head(
            version=version,
            headers=raw,
            framing=framing,
            content_length=length,
            method=method,
            target=target,
            status=status,
            reason=reason,
            keep_alive=keep_alive,
            upgrade=upgrade,
            names=names,
        )
