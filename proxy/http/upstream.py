"""Getting an upstream for one exchange, and the raw tunnel after a 101."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

import trio

from proxy.http.conn import BodyEvent, Downstream, Upstream
from proxy.http.exchange import PeerError, RequestOutcome
from proxy.http.pool import UpstreamPool
from proxy.http.routing import UpstreamFailure
from proxy.http.wire import Body, Head, Request

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
