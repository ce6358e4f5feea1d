"""h11 connections over trio streams: the client-facing side (we are the
server) and the upstream side (we are the client).

Theory of operation: h11 holds the protocol state; these classes only move
bytes and apply deadlines. The client-facing side checks every request head
and chunked body with :mod:`proxy.http.framing` before h11 interprets it.
Errors split the h11 way: :class:`~proxy.http.exchange.PeerError` (they sent
something wrong, went quiet or went away: answer 4xx/5xx if we still can,
then close); anything else is ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from proxy.http.exchange import PeerError
from proxy.http.framing import HeadError, HeadScanner, check_chunked_buffer, check_head

_RECV = 65536

Event = h11.Request | h11.Response | h11.InformationalResponse | h11.Data | h11.EndOfMessage


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


_RESPONSE_DONE = (h11.DONE, h11.MUST_CLOSE)


class Downstream:
    """The connection from the client (agent or peer); h11 SERVER role."""

    def __init__(self, stream: trio.abc.Stream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=limits.max_header_bytes + 1024
        )
        self.closed_by_peer = False
        self._pending: list[bytes] = []
        # Called by the flush that completes a response, before its bytes
        # leave: the request's audit records reach the sink first.
        self.before_release: Callable[[], None] | None = None

    async def _receive(self, timeout: float, on_timeout: PeerError) -> bytes:
        with trio.move_on_after(timeout):
            try:
                data = bytes(await self.stream.receive_some(_RECV))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # A reset (or a TLS stream that broke) is the client leaving,
                # not a fault of ours: nothing to answer, one close record.
                raise PeerError(0, "client_reset", f"client connection broke: {exc}") from exc
            self.h11.receive_data(data)
            return data
        raise on_timeout

    async def next_request(self, idle_deadline: float = math.inf) -> h11.Request | None:
        """The next request head, checked strictly; None on a clean close.
        ``idle_deadline`` (trio time) cuts the wait for a new request short."""
        try:
            return await self._next_request(idle_deadline)
        except HeadError as exc:
            raise PeerError(exc.status, exc.reason, exc.message) from exc

    async def _next_request(self, idle_deadline: float) -> h11.Request | None:
        # Bytes h11 already holds (pipelined after the last exchange) are
        # copied out once; new bytes are scanned once each as they arrive.
        scanner = HeadScanner(self.limits.max_header_bytes)
        pending, closed = self.h11.trailing_data
        started = time.monotonic() if pending else None
        end = scanner.feed(pending) if pending else None
        while end is None:
            if closed:
                if started is not None:
                    raise PeerError(400, "bad_request", "connection closed inside a request head")
                self.closed_by_peer = True
                return None
            if started is None:
                timeout = min(self.limits.idle_timeout, idle_deadline - trio.current_time())
                error = PeerError(0, "idle_timeout", "idle connection closed")
            else:
                timeout = self.limits.request_timeout - (time.monotonic() - started)
                error = PeerError(408, "request_timeout", "request head not complete in time")
            data = await self._receive(max(timeout, 0), error)
            if not data:
                closed = True
                continue
            started = started or time.monotonic()
            end = scanner.feed(data)
        check_head(scanner.head, self.limits.max_header_bytes, self.limits.max_headers)
        event = self._next_event()
        assert isinstance(event, h11.Request)
        return event

    def _next_event(self) -> Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            reason = "unsupported_transfer_encoding" if status == 501 else "bad_request"
            raise PeerError(status, reason, str(exc)) from exc
        if isinstance(event, h11.ConnectionClosed):
            raise PeerError(400, "bad_request", "connection closed inside a request")
        return event  # type: ignore[return-value]

    def buffered_body_event(self) -> h11.Data | h11.EndOfMessage | None:
        """A body event h11 can produce from what is already buffered."""
        event = self._next_event()
        if event is h11.NEED_DATA:
            if self.h11.their_state is h11.SEND_BODY:
                check_chunked_or_raise(self.h11)
            return None
        assert isinstance(event, (h11.Data, h11.EndOfMessage)), event
        return event

    async def next_body_event(
        self, before_wait: Callable[[], Awaitable[None]] | None = None
    ) -> h11.Data | h11.EndOfMessage:
        while True:
            event = self.buffered_body_event()
            if event is not None:
                return event
            if self.h11.trailing_data[1]:
                raise PeerError(400, "bad_request", "connection closed inside a request body")
            if before_wait is not None:
                await before_wait()
            await self._receive(
                self.limits.request_timeout,
                PeerError(408, "request_timeout", "request body stalled"),
            )

    async def read_whole_body(self, limit: int) -> bytes:
        """The whole request body (a decision that binds its hash, or an
        agent protocol's calls); over ``limit`` is a 413."""
        if self.h11.they_are_waiting_for_100_continue:
            await self.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self.next_body_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            size += len(event.data)
            if size > limit:
                raise PeerError(413, "body_too_large", f"request body over {limit} bytes")
            chunks.append(bytes(event.data))

    def body_ended(self) -> bool:
        """Whether the request's body is already over (none was framed, or
        all of it is buffered): a refusal can then keep the connection."""
        try:
            while (event := self.buffered_body_event()) is not None:
                if isinstance(event, h11.EndOfMessage):
                    return True
        except PeerError:
            pass
        return False

    def queue(
        self, event: h11.Response | h11.InformationalResponse | h11.Data | h11.EndOfMessage
    ) -> None:
        """Serialise ``event`` now, send it with the next :meth:`flush`. One
        write per burst instead of per event: on loopback each send is a
        syscall that also runs the receiver's TCP stack."""
        data = self.h11.send(event)
        if data:
            self._pending.append(data)

    async def flush(self) -> None:
        if self._pending:
            if self.before_release is not None and self.h11.our_state in _RESPONSE_DONE:
                self.before_release()
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            await send_within(
                self.stream,
                data,
                self.limits.write_timeout,
                PeerError(0, "write_timeout", "the client stopped reading"),
            )

    async def send(
        self, event: h11.Response | h11.InformationalResponse | h11.Data | h11.EndOfMessage
    ) -> None:
        self.queue(event)
        await self.flush()

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def aclose(self) -> None:
        await self.stream.aclose()


async def send_within(
    stream: trio.abc.Stream, data: bytes, timeout: float, on_timeout: PeerError
) -> None:
    """``send_all`` under the write timeout."""
    with trio.move_on_after(timeout):
        await stream.send_all(data)
        return
    raise on_timeout


def check_chunked_or_raise(conn: h11.Connection) -> None:
    pending = conn.trailing_data[0]
    if pending:
        try:
            check_chunked_buffer(pending)
        except HeadError as exc:
            raise PeerError(exc.status, exc.reason, exc.message) from exc


def upstream_broken(exc: BaseException) -> PeerError:
    """An upstream that broke mid-exchange. In TLS 1.3 a server judges our
    certificate after our side of the handshake is done, so its refusal
    arrives here, as an alert, on the first read."""
    text = f"{exc} {exc.__cause__ or ''}"
    if "alert" in text.lower():
        return PeerError(502, "upstream_refused", "the upstream refused our identity (TLS alert)")
    return PeerError(502, "upstream_reset", "the upstream connection broke")


class Upstream:
    """A connection to the target or an upstream sidecar; h11 CLIENT role.

    Pooled between requests: ``key`` says which pool it belongs to.
    """

    def __init__(self, stream: trio.abc.Stream, key: object, limits: Limits) -> None:
        self.stream = stream
        self.key = key
        self.limits = limits
        self.h11 = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=limits.max_header_bytes + 1024
        )
        self.created = time.monotonic()
        self.last_used = self.created
        self.expires_at = math.inf  # trio time: peer certificate expiry or max lifetime
        self.requests = 0
        self.peer_id: str | None = None
        self.peer_serial: str | None = None
        self.peer_not_after: str | None = None
        self._pending: list[bytes] = []

    def queue(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        data = self.h11.send(event)
        if data:
            self._pending.append(data)

    async def flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            await send_within(
                self.stream,
                data,
                self.limits.write_timeout,
                PeerError(504, "upstream_write_timeout", "the upstream stopped reading"),
            )

    async def send(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        self.queue(event)
        await self.flush()

    async def next_event(
        self, timeout: float, before_wait: Callable[[], Awaitable[None]] | None = None
    ) -> h11.Response | h11.InformationalResponse | h11.Data | h11.EndOfMessage:
        """The next response event; ``before_wait`` runs before any network
        wait (the caller flushes what it queued for the client)."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise PeerError(502, "bad_upstream_response", str(exc)) from exc
            if event is h11.NEED_DATA:
                if before_wait is not None:
                    await before_wait()
                with trio.move_on_after(timeout):
                    try:
                        data = await self.stream.receive_some(_RECV)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise upstream_broken(exc) from exc
                    self.h11.receive_data(bytes(data))
                    continue
                raise PeerError(504, "upstream_timeout", "upstream did not answer in time")
            if isinstance(event, h11.ConnectionClosed):
                raise PeerError(502, "upstream_closed", "upstream closed the connection")
            assert not isinstance(event, h11.Request) and event is not h11.PAUSED
            return event  # type: ignore[return-value]

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


async def linger_close(
    stream: trio.abc.Stream, *, seconds: float = 2.0, max_bytes: int = 1 << 20
) -> None:
    """Half-close, then read and drop what the client still sends for a
    moment before closing. Closing a socket with unread input makes the
    kernel send RST, which can destroy the error response we just wrote
    before the client reads it (RFC 9112 9.6)."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        drained = 0
        with trio.move_on_after(seconds):
            while drained < max_bytes:
                data = await stream.receive_some(65536)
                if not data:
                    break
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass
