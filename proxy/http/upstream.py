"""The upstream side of an HTTP exchange (we are the client): the
connection, getting one for an exchange, and the raw tunnel after a 101.
As for the client side (:mod:`proxy.http.conn`), the parser reads, the
pure writer frames, a :class:`~proxy.http.cycle.Cycle` decides reuse, and
these only move bytes and apply deadlines."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any

import trio

from proxy.http.conn import (
    HEAD_RECV_BYTES,
    RECV_BYTES,
    BodyEvent,
    Downstream,
    Limits,
    ResponseEvent,
    peer_error,
)
from proxy.http.cycle import Cycle, Side
from proxy.http.exchange import PeerError, RequestOutcome
from proxy.http.parsers import make_parser
from proxy.http.routing import UpstreamFailure
from proxy.http.streams import receive_within, send_within, upstream_broken
from proxy.http.wire import NEED_DATA, Body, End, Head, ParseError, Request
from proxy.http.writer import BodyWriter, request_framing, request_head

if TYPE_CHECKING:
    from proxy.http.pool import UpstreamPool

_UPSTREAM_TIMEOUT = PeerError(504, "upstream_timeout", "upstream did not answer in time")
_UPSTREAM_WRITE_TIMEOUT = PeerError(504, "upstream_write_timeout", "the upstream stopped reading")


class Upstream:
    """A connection to the target or an upstream sidecar; we are the client.

    Pooled between requests: ``key`` says which pool it belongs to.
    """

    def __init__(self, stream: trio.abc.Stream, key: object, limits: Limits) -> None:
        self.stream = stream
        self.key = key
        self.limits = limits
        self.parser = make_parser("response", limits.parser)
        self.cycle = Cycle()
        self.created = time.monotonic()
        self.last_used = self.created
        self.expires_at = math.inf  # trio time: peer certificate expiry or max lifetime
        self.requests = 0
        self.peer_id: str | None = None
        self.peer_serial: str | None = None
        self.peer_not_after: str | None = None
        self.peer_addr: str | None = None  # host:port the connection went to
        # The pool's poll object for this connection's socket (False: none to poll).
        self.poller: Any = None
        self._eof = False
        self._body: BodyWriter | None = None
        self._pending: list[bytes] = []

    def queue(self, event: Request | Body | End) -> None:
        if isinstance(event, Body):
            assert self._body is not None, "body before head"
            if event.data:
                self._pending.append(self._body.data(event.data))
        elif isinstance(event, End):
            assert self._body is not None, "end before head"
            self._pending.append(self._body.end(event.trailers))
            self._body = None
            self.cycle.wrote_end()
        else:
            fields = event.headers.raw_items()
            framing, length, closes = request_framing(event.headers, names_lowered=True)
            self._pending.append(request_head(event.method, event.target, fields))
            self._body = BodyWriter(framing, length)
            self.cycle.wrote_head(closes)
            if event.method == b"HEAD":
                self.parser.for_head_request()

    async def flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            await send_within(self.stream, data, self.limits.write_timeout, _UPSTREAM_WRITE_TIMEOUT)

    async def send(self, event: Request | Body | End) -> None:
        self.queue(event)
        await self.flush()

    async def next_event(
        self, timeout: float, before_wait: Callable[[], Awaitable[None]] | None = None
    ) -> ResponseEvent:
        """The next response event; ``before_wait`` runs before any network
        wait (the caller flushes what it queued for the client)."""
        parser = self.parser
        while True:
            try:
                event = parser.next_event()
                if event is NEED_DATA:
                    if self._eof:  # closed before (or between) answers
                        raise ParseError(502, "upstream_closed", "upstream closed the connection")
                    if before_wait is not None:
                        await before_wait()
                    size = RECV_BYTES if self.cycle.reading is Side.BODY else HEAD_RECV_BYTES
                    try:
                        data = await receive_within(self.stream, size, timeout, _UPSTREAM_TIMEOUT)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise self.broke(exc) from exc
                    except PeerError:
                        self.cycle.broken("upstream_timeout")
                        raise
                    self._eof = not data
                    parser.feed(data)
                    continue
            except ParseError as exc:
                self.cycle.broken(exc.reason)
                raise peer_error(exc) from exc
            if isinstance(event, Head):
                if event.status >= 200 or event.status == 101:
                    self.cycle.read_head(event)
            elif isinstance(event, End):
                self.cycle.read_end()
            return event

    def broke(self, exc: BaseException) -> PeerError:
        """What a transport error mid-answer becomes (as :meth:`next_event` says it)."""
        self.cycle.broken("upstream_reset")
        return upstream_broken(exc)

    def timed_out(self) -> PeerError:
        """What an answer that stalls for the response timeout becomes."""
        self.cycle.broken("upstream_timeout")
        return PeerError(
            _UPSTREAM_TIMEOUT.status, _UPSTREAM_TIMEOUT.reason, _UPSTREAM_TIMEOUT.message
        )

    def reusable(self) -> bool:
        return self.cycle.reusable

    def start_next_cycle(self) -> None:
        self.cycle.next_cycle()
        self.parser.start_next_cycle()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


# Moves raw bytes both ways until either side ends; (bytes up, bytes down).
# The runtime supplies it (its relay keeps half-close and the write timeout).
RawRelay = Callable[[trio.abc.Stream, trio.abc.Stream], Awaitable[tuple[int, int]]]


async def start_upstream(
    pool: UpstreamPool,
    key: Hashable | None,
    request: Request,
    prefetched: list[BodyEvent],
    body_complete: bool,
    outcome: RequestOutcome,
    response_timeout: float,
) -> tuple[Upstream, Head | None]:
    """Send the head; with a complete small body, also send it and read the
    first response event, so a stale pooled connection can be retried once
    on a fresh one without the client noticing."""
    for attempt in (0, 1):
        up, reused = await pool.checkout(key)
        try:
            up.queue(request)
            if not (reused and body_complete):
                return up, None  # the relay sends the head with the body
            for event in prefetched:
                up.queue(event)
                if isinstance(event, Body):
                    outcome.bytes_up += len(event.data)
            await up.flush()
            first = await up.next_event(response_timeout)
            if not isinstance(first, Head):  # a body before any head: not HTTP
                raise PeerError(502, "bad_upstream_response", "upstream answer without a head")
            return up, first
        except (trio.BrokenResourceError, trio.ClosedResourceError, PeerError) as exc:
            await pool.discard(up)
            outcome.bytes_up = 0
            stale = (
                reused
                and attempt == 0
                and not (isinstance(exc, PeerError) and exc.reason == "upstream_timeout")
            )
            if not stale:
                if isinstance(exc, PeerError):
                    raise
                raise UpstreamFailure(502, "upstream_unavailable", str(exc)) from exc
    raise AssertionError("unreachable")


async def tunnel(
    down: Downstream,
    up: Upstream,
    pool: UpstreamPool,
    outcome: RequestOutcome,
    raw_relay: RawRelay | None,
) -> None:
    """After a 101 the connection is no longer HTTP: relay raw bytes,
    starting with whatever either parser had buffered past the handshake."""
    leftover_down = down.parser.buffered
    leftover_up = up.parser.buffered
    try:
        if leftover_down:
            await up.stream.send_all(leftover_down)
        if leftover_up:
            await down.stream.send_all(leftover_up)
        if raw_relay is None:  # this session cannot carry another protocol
            return
        bytes_up, bytes_down = await raw_relay(down.stream, up.stream)
        outcome.bytes_up += bytes_up + len(leftover_down)
        outcome.bytes_down += bytes_down + len(leftover_up)
    finally:
        await pool.discard(up)
