"""HTTP/1.1 connections over trio streams: the client-facing side (we are
the server); the upstream side (we are the client) is in
:mod:`proxy.http.upstream`, on the same parts.

Theory of operation: a :class:`~proxy.http.wire.MessageParser` (from
:func:`~proxy.http.parsers.make_parser`) reads the peer's messages, the
pure :mod:`proxy.http.writer` frames ours, and a
:class:`~proxy.http.cycle.Cycle` decides whether the connection may carry
another exchange. These classes only move bytes and apply deadlines.
Requests cross into the session as :class:`~proxy.http.wire.Request`,
bodies as the parser's :class:`~proxy.http.wire.Body` and
:class:`~proxy.http.wire.End`, our own answers as
:class:`~proxy.http.wire.Answer`: plain values of the parser seam, no h11
on this path (h11 is the admin endpoint's server and the parsers' oracle).
Upstream answers come out as the parser's :class:`~proxy.http.wire.Head`,
``Body`` and ``End``. Errors split the h11 way:
:class:`~proxy.http.exchange.PeerError` (they sent something wrong, went
quiet or went away: answer 4xx/5xx if we still can, then close); anything
else is ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from proxy.http.cycle import Cycle, Side
from proxy.http.exchange import PeerError
from proxy.http.parsers import make_parser
from proxy.http.streams import linger_close as linger_close  # the session and admin use it
from proxy.http.streams import nothing_unread, receive_within, send_within
from proxy.http.wire import (
    NEED_DATA,
    Answer,
    Body,
    End,
    Fields,
    Framing,
    Head,
    Header,
    NeedData,
    ParseError,
    ParserLimits,
    Request,
    lowered,
)
from proxy.http.writer import (
    BodyWriter,
    frame_response,
    response_head,
)

# Up to 256 KiB per read: a TLS stream returns every full record already
# there (proxy.tls.raw_io.recv_records), so a bulk body costs one pass of
# the relay per burst instead of one per 16 KiB record. The bench's 1 MiB
# keep-alive row through the HTTP pair (8 connections): 372 -> 513 req/s,
# proxy CPU per request 2,690 -> 1,950 us. Reads go through a reused buffer
# (raw_io.read_plain, recv_records): a 256 KiB os.read would mmap per read.
RECV_BYTES = 262144
# The read that starts an answer takes less: whatever of a large
# Content-Length body it takes goes through the relay, and the rest
# around it (proxy.runtime.direct). An answer this small still comes in
# one read.
HEAD_RECV_BYTES = 65536
# What a wait raises when its deadline passes (receive_within and
# send_within raise a fresh copy): built once, not per request.
_WRITE_TIMEOUT = PeerError(0, "write_timeout", "the client stopped reading")
_IDLE_TIMEOUT = PeerError(0, "idle_timeout", "idle connection closed")
_REQUEST_TIMEOUT = PeerError(408, "request_timeout", "request head not complete in time")
_BODY_TIMEOUT = PeerError(408, "request_timeout", "request body stalled")

BodyEvent = Body | End
AnswerEvent = Answer | Body | End
ResponseEvent = Head | Body | End


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 65536
    max_headers: int = 100
    idle_timeout: float = 60.0
    request_timeout: float = 30.0
    response_timeout: float = 60.0
    # A send that makes no progress for this long ends the exchange: a peer
    # that stops reading must not hold our connection (and the other side's).
    write_timeout: float = 60.0

    @property
    def parser(self) -> ParserLimits:
        return ParserLimits(self.max_header_bytes, self.max_headers)


def peer_error(exc: ParseError) -> PeerError:
    return PeerError(exc.status, exc.reason, exc.message)


class Downstream:
    """The connection from the client (agent or peer); we are the server."""

    def __init__(self, stream: trio.abc.Stream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.parser = make_parser("request", limits.parser)
        self.cycle = Cycle()
        self.closed_by_peer = False
        self._eof = False
        self._method = b""  # of the request under way: a HEAD answer has no body
        self._http10 = False
        self._body: BodyWriter | None = None
        self._pending: list[bytes] = []
        # Called by the flush that completes a response, before its bytes
        # leave: the request's audit records reach the sink first.
        self.before_release: Callable[[], None] | None = None

    # -- reading ------------------------------------------------------------

    async def _receive(self, timeout: float, on_timeout: PeerError) -> bytes:
        try:
            data = await receive_within(self.stream, RECV_BYTES, timeout, on_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # A reset (or a TLS stream that broke) is the client leaving,
            # not a fault of ours: nothing to answer, one close record.
            self.cycle.broken("client_reset")
            raise PeerError(0, "client_reset", f"client connection broke: {exc}") from exc
        except PeerError:
            self.cycle.broken(on_timeout.reason)
            raise
        if data:
            self._parse(self.parser.feed, data)
        else:
            self._eof = True
        return data

    def _parse(self, step: Callable[[bytes], None], data: bytes) -> None:
        try:
            step(data)
        except ParseError as exc:
            self.cycle.broken(exc.reason)
            raise peer_error(exc) from exc

    def _next_event(self) -> Head | Body | End | NeedData:
        try:
            return self.parser.next_event()
        except ParseError as exc:
            self.cycle.broken(exc.reason)
            raise peer_error(exc) from exc

    async def next_request(self, idle_deadline: float = math.inf) -> Request | None:
        """The next request head, checked strictly; None on a clean close.
        ``idle_deadline`` (trio time) cuts the wait for a new request short."""
        started = time.monotonic() if self.parser.buffered else None
        while (event := self._next_event()) is NEED_DATA:
            if self._eof:
                if started is not None:
                    self.cycle.broken("bad_request")
                    raise PeerError(400, "bad_request", "connection closed inside a request head")
                self.closed_by_peer = True
                return None
            if started is None:
                timeout = self.limits.idle_timeout
                if idle_deadline < math.inf:  # else no clock to read
                    timeout = min(timeout, idle_deadline - trio.current_time())
                error = _IDLE_TIMEOUT
            else:
                timeout = self.limits.request_timeout - (time.monotonic() - started)
                error = _REQUEST_TIMEOUT
            if await self._receive(max(timeout, 0), error):
                started = started or time.monotonic()
        assert isinstance(event, Head), event
        self.cycle.read_head(event)
        self._method = event.method
        self._http10 = event.version == b"1.0"
        # The parser checked every byte of the head already.
        fields = Fields(lowered(event), event.headers)
        return Request(event.method, event.target, fields, event.version, event.names)

    @property
    def body_pending(self) -> bool:
        """The request's body (or its end) has not been read yet."""
        return self.cycle.reading is Side.BODY

    def buffered_body_event(self) -> BodyEvent | None:
        """A body event the parser can produce from what is already buffered."""
        event = self._next_event()
        if event is NEED_DATA:
            return None
        if isinstance(event, Body):
            self.cycle.read_body()
            return event
        assert isinstance(event, End), event
        self.cycle.read_end()
        return event

    async def next_body_event(
        self, before_wait: Callable[[], Awaitable[None]] | None = None
    ) -> BodyEvent:
        while True:
            event = self.buffered_body_event()
            if event is not None:
                return event
            if self._eof:
                self.cycle.broken("bad_request")
                raise PeerError(400, "bad_request", "connection closed inside a request body")
            if before_wait is not None:
                await before_wait()
            await self._receive(self.limits.request_timeout, _BODY_TIMEOUT)

    async def read_whole_body(self, limit: int) -> bytes:
        """The whole request body (a decision that binds its hash, or an
        agent protocol's calls); over ``limit`` is a 413."""
        if self.cycle.expect_continue:
            self.queue_informational(100, b"Continue", ())
            await self.flush()
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self.next_body_event()
            if isinstance(event, End):
                return b"".join(chunks)
            size += len(event.data)
            if size > limit:
                self.cycle.broken("body_too_large")
                raise PeerError(413, "body_too_large", f"request body over {limit} bytes")
            chunks.append(bytes(event.data))

    def body_ended(self) -> bool:
        """Whether the request's body is already over (none was framed, or
        all of it is buffered): a refusal can then keep the connection."""
        try:
            while (event := self.buffered_body_event()) is not None:
                if isinstance(event, End):
                    return True
        except PeerError:
            pass
        return False

    # -- writing ------------------------------------------------------------

    def queue_informational(self, status: int, reason: bytes, headers: Iterable[Header]) -> None:
        self._pending.append(response_head(status, reason, headers))
        self.cycle.wrote_informational(status)

    def queue_response(
        self, status: int, reason: bytes, headers: list[Header], *, lowered: bool = False
    ) -> None:
        """Our answer's head, framed for this client (see :mod:`proxy.http.writer`);
        ``lowered``: every name in ``headers`` is lower-case already."""
        fields, framing, length, close = frame_response(
            status,
            headers,
            head_request=self._method == b"HEAD",
            client_http10=self._http10,
            keep_alive=self.cycle.close_reason is None,
            names_lowered=lowered,
        )
        self._pending.append(response_head(status, reason, fields))
        self._body = BodyWriter(framing, length)
        self.cycle.wrote_head(close)

    def queue_data(self, data: bytes) -> None:
        assert self._body is not None, "body before head"
        if data:
            self._pending.append(self._body.data(data))

    def length_left(self) -> int:
        """Bytes still to send of our answer's Content-Length body (0 when
        it is framed otherwise), once everything queued is sent."""
        body = self._body
        if body is None or body.framing is not Framing.LENGTH or self._pending:
            return 0
        return body.left

    @staticmethod
    def write_timed_out() -> PeerError:
        """What a client that stops reading our answer becomes (as the flush says it)."""
        return PeerError(_WRITE_TIMEOUT.status, _WRITE_TIMEOUT.reason, _WRITE_TIMEOUT.message)

    def sent_around(self, count: int) -> None:
        """``count`` bytes of our answer's body were sent on the stream
        without us (the reactor moved them)."""
        assert self._body is not None, "body before head"
        self._body.sent_around(count)

    def queue_end(self) -> None:
        assert self._body is not None, "end before head"
        self._pending.append(self._body.end())
        self._body = None
        self.cycle.wrote_end()

    def queue(self, event: AnswerEvent) -> None:
        """Serialise ``event`` now, send it with the next :meth:`flush`. One
        write per burst instead of per event: on loopback each send is a
        syscall that also runs the receiver's TCP stack."""
        if isinstance(event, Body):
            self.queue_data(event.data)
        elif isinstance(event, End):
            self.queue_end()
        elif event.status >= 200:
            self.queue_response(event.status, event.reason, list(event.headers))
        else:
            self.queue_informational(event.status, event.reason, event.headers)

    async def flush(self) -> None:
        if self._pending:
            if self.before_release is not None and self.cycle.writing is Side.DONE:  # answered
                self.before_release()
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            await send_within(self.stream, data, self.limits.write_timeout, _WRITE_TIMEOUT)

    async def send(self, event: AnswerEvent) -> None:
        self.queue(event)
        await self.flush()

    # -- between exchanges --------------------------------------------------

    def reusable(self) -> bool:
        return self.cycle.reusable

    def may_close_at_once(self) -> bool:
        """The client said close, all it sent is read, and nothing more
        waits: closing cannot reset our answer away, so no lingering close
        (which costs a half-close and a wait for the client's EOF)."""
        cycle = self.cycle
        return (
            cycle.peer_said_close
            and cycle.reading is Side.DONE
            and not self.parser.buffered
            and nothing_unread(self.stream)
        )

    def start_next_cycle(self) -> None:
        self.cycle.next_cycle()
        self.parser.start_next_cycle()
        self._method = b""

    async def aclose(self) -> None:
        await self.stream.aclose()
