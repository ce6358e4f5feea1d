"""Streaming one allowed exchange: the request body up, the answer down.

Theory of operation. Most requests are complete when they are allowed (no
body, or all of it already buffered): the relay sends them, then relays the
answer in the same task, since a nursery per request costs more than the
request. A request whose body is still arriving streams it up in one task
while the answer streams down in another, so a large upload and an early
answer both work; when the answer ends before the request body, reading
the body stops (the connection then closes, so the unread rest is never
taken for the next request).

What went wrong is kept apart by side: :attr:`Relay.request_error` (the
client's body broke, stalled, or the upstream stopped taking it),
:attr:`Relay.upstream_error` (the answer broke, stalled or was unreadable)
and :attr:`Relay.transport_error` (the client went away while we answered).
The session turns those into the exchange's events and the audit record.

An answer filter from an agent-protocol hook either streams (SSE, rewritten
event by event) or holds the answer whole (JSON), which is then re-framed
with its new length.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NamedTuple, Protocol

import trio

from proxy.http.agent_hook import FilterFactory, ResponseFilter
from proxy.http.conn import BodyEvent as BodyEvent  # the session names it from here
from proxy.http.conn import Downstream, Limits, ResponseEvent
from proxy.http.exchange import Ev, Exchange, PeerError
from proxy.http.headers import REQUEST_ID, Header, forwardable, header_value
from proxy.http.streams import upstream_broken
from proxy.http.upstream import Upstream
from proxy.http.wire import Body, End, Framing, Head, lowered


def _filtered(step: Callable[[], bytes]) -> bytes:
    """Run a response filter step; what cannot be filtered is not passed on."""
    try:
        return step()
    except Exception as exc:  # a list answer we cannot read safely: fail closed
        raise PeerError(502, "unfilterable_response", str(exc)) from exc


_INF = math.inf

# A Content-Length answer with at least this much still unread once the
# parser is empty goes to the runtime's reactor (``DirectBody``) instead of
# through the parser and the stream layers in this task.
DIRECT_MIN = 65536


class Moved(NamedTuple):
    """What a :data:`DirectBody` moved (all of it sent), and why it stopped:
    ``closed`` (all), ``eof`` (the upstream ended first), ``upstream_reset``,
    ``client_reset``, ``write_timeout``, ``idle_timeout``."""

    sent: int
    reason: str
    detail: str | None


# (upstream stream, client stream, bytes, write timeout, idle timeout) ->
# what moved, or None when these streams cannot be handed off.
DirectBody = Callable[
    [trio.abc.Stream, trio.abc.Stream, int, float, float], Awaitable["Moved | None"]
]


class Canceller(Protocol):
    """What each direction calls when the exchange must stop: the nursery's
    cancel scope when both run at once, nothing when they run in turn (the
    request is all sent before the response is read)."""

    def cancel(self) -> None: ...


class _InTurn:
    def cancel(self) -> None:
        pass


_SEQUENTIAL = _InTurn()


class Relay:
    def __init__(
        self,
        down: Downstream,
        up: Upstream,
        limits: Limits,
        exchange: Exchange,
        *,
        to_send: list[BodyEvent],
        body_complete: bool,
        first: Head | None,
        upgrade_allowed: bool,
        filter_factory: FilterFactory | None,
        upward: Callable[[BodyEvent], BodyEvent],
        lifetime_deadline: float,
        direct: DirectBody | None = None,
    ) -> None:
        self.down, self.up, self.limits, self.exchange = down, up, limits, exchange
        self.outcome = exchange.outcome
        self.to_send = to_send
        self.body_complete = body_complete
        self.first = first
        self.upgrade_allowed = upgrade_allowed
        self.filter_factory = filter_factory
        self.upward = upward  # trailers get the header rules on their way up
        # trio time: max_connection_lifetime passed, say close (inf: none set)
        self.lifetime_deadline = lifetime_deadline
        self.direct = direct  # set while the request is all sent (one task drives both)
        self.request_error: PeerError | None = None
        self.upstream_error: PeerError | None = None
        self.transport_error = False
        self.response_started = False
        self.switched = False
        self._filter: ResponseFilter | None = None
        # A whole-answer filter's head (status, reason, fields), re-framed at the end.
        self._held: tuple[int, bytes, list[Header]] | None = None

    async def run(self) -> None:
        try:
            if self.body_complete or not self.down.body_pending:
                # One direction after the other, nothing to cancel: no scope
                # (a cancel scope costs more than a small exchange's send).
                # With the first answer event in hand, start_upstream has
                # sent the whole request already: nothing is left to pump.
                if self.first is None or self.to_send:
                    await self._pump_request(_SEQUENTIAL)
                if self.request_error is None:
                    await self._relay_response(_SEQUENTIAL)
            else:
                self.direct = None  # the request body still streams: the client side is busy
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_request, nursery.cancel_scope)
                    nursery.start_soon(self._relay_response, nursery.cancel_scope)
        except PeerError as exc:
            self.upstream_error = exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.transport_error = True
            self.outcome.error = str(exc)
        except BaseExceptionGroup as group:
            peer, rest = group.split(PeerError)
            if rest is not None:
                _broken, other = rest.split((trio.BrokenResourceError, trio.ClosedResourceError))
                if other is not None:
                    raise other from None
                self.transport_error = True
            if peer is not None:
                first = peer.exceptions[0]
                assert isinstance(first, PeerError)
                self.upstream_error = first

    # -- up -------------------------------------------------------------------

    async def _pump_request(self, cancel: Canceller) -> None:
        up, outcome = self.up, self.outcome
        side = "upstream_reset"
        try:
            for event in self.to_send:
                up.queue(self.upward(event))
                if isinstance(event, Body):
                    outcome.bytes_up += len(event.data)
            if self.body_complete or not self.down.body_pending:
                await up.flush()
                return
            while True:
                side = "client_reset"
                event = await self.down.next_body_event(before_wait=up.flush)
                side = "upstream_reset"
                up.queue(self.upward(event))
                if isinstance(event, End):
                    await up.flush()
                    return
                outcome.bytes_up += len(event.data)
        except PeerError as exc:
            self.request_error = exc
            cancel.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if side == "upstream_reset":
                self.request_error = upstream_broken(exc)
            else:
                self.request_error = PeerError(0, side, str(exc))
            cancel.cancel()

    # -- down -----------------------------------------------------------------

    async def _relay_response(self, cancel: Canceller) -> None:
        event: ResponseEvent | None = self.first
        while True:
            if event is None:
                if self.direct is not None and self.up.parser.body_unbuffered() >= DIRECT_MIN:
                    await self._move_directly(self.direct)
                event = await self.up.next_event(
                    self.limits.response_timeout, before_wait=self.down.flush
                )
            if isinstance(event, Head):
                # Names lower-cased once, by the parser: the header rules match on them.
                headers = lowered(event)
                if event.status >= 200:
                    self._response_head(event, headers)
                elif event.status == 101:
                    if not self.upgrade_allowed:
                        # A switch we did not forward a request for: passing it
                        # on would let the client speak past our parser.
                        raise PeerError(502, "bad_upstream_response", "unrequested 101 answer")
                    await self._switch(event, headers)
                    cancel.cancel()
                    return
                elif event.status != 100:  # we answered 100-continue ourselves
                    self.down.queue_informational(event.status, event.reason, forwardable(headers))
                    await self.down.flush()
            elif isinstance(event, Body):
                if self._filter is None:  # as received (in place: one call less per chunk)
                    self.outcome.bytes_down += len(event.data)
                    self.down.queue_data(event.data)
                else:
                    self._filtered_data(event.data)
            else:
                await self._response_end()
                if self.down.body_pending:
                    cancel.cancel()  # answered before the request body ended: stop reading it
                return
            event = None

    async def _move_directly(self, direct: DirectBody) -> None:
        """Hand the rest of a Content-Length answer but its last byte to the
        reactor, which moves it socket to socket without this task; the
        parser and the writer are told, and the last byte comes the usual
        way, so the audit record still goes out before the answer is all
        released. Whatever stopped the reactor is reported as the usual
        way would have reported it (an early EOF is left for it to find)."""
        if self._filter is not None or self._held is not None:
            return
        await self.down.flush()  # the head and what was buffered go first
        count = self.up.parser.body_unbuffered()
        if count < DIRECT_MIN or self.down.length_left() != count:
            return  # framed differently for this client: the usual way
        moved = await direct(
            self.up.stream,
            self.down.stream,
            count - 1,
            self.limits.write_timeout,
            self.limits.response_timeout,
        )
        if moved is None:
            self.direct = None  # these streams cannot be handed off: not again
            return
        self.up.parser.skip_body(moved.sent)
        self.down.sent_around(moved.sent)
        self.outcome.bytes_down += moved.sent
        reason = moved.reason
        if reason in ("closed", "eof"):
            return
        if reason == "upstream_reset":
            raise self.up.broke(trio.BrokenResourceError(moved.detail))
        if reason == "idle_timeout":
            raise self.up.timed_out()
        if reason == "write_timeout":
            raise self.down.write_timed_out()
        raise trio.BrokenResourceError(moved.detail)  # client_reset (or the reactor failed)

    async def _switch(self, event: Head, headers: list[Header]) -> None:
        self.response_started = True
        self.outcome.status = 101
        self.down.queue_informational(101, event.reason, forwardable(headers, keep_upgrade=True))
        await self.down.flush()
        self.switched = True
        self.exchange.on(Ev.SWITCHED)

    def _response_head(self, event: Head, received: list[Header]) -> None:
        self.response_started = True
        self.exchange.on(Ev.RESPONSE_HEAD)
        outcome = self.outcome
        outcome.status = event.status
        headers = forwardable(received, names=event.names)
        if event.framing is Framing.CHUNKED or event.framing is Framing.UNTIL_CLOSE:
            # Re-chunked (or read until close) for the client: no length.
            headers = [h for h in headers if h[0] != b"content-length"]
        if header_value(headers, REQUEST_ID) is None:
            headers.append((REQUEST_ID, outcome.request_id.encode()))
        deadline = self.lifetime_deadline
        if deadline < _INF and trio.current_time() >= deadline:
            headers.append((b"connection", b"close"))
        headers.extend(outcome.reply_headers)
        if self.filter_factory is not None and event.status == 200:
            content_type = (header_value(received, b"content-type") or b"").decode("latin-1")
            self._filter = self.filter_factory(content_type.lower())
            # The body changes length: re-frame it.
            headers = [h for h in headers if h[0] != b"content-length"]
            if self._filter.whole:
                self._held = (200, event.reason, headers)
                return
        # Every name is lower-case unless a rule's reply headers were added.
        lower = not outcome.reply_headers
        self.down.queue_response(event.status, event.reason, headers, lowered=lower)

    def _filtered_data(self, data: bytes) -> None:
        assert self._filter is not None
        out = _filtered(partial(self._filter.feed, data))
        self.outcome.bytes_down += len(out)  # what the client gets
        if out:
            self.down.queue_data(out)

    async def _response_end(self) -> None:
        if self._filter is not None:
            tail = _filtered(self._filter.finish)
            self.outcome.bytes_down += len(tail)
            if self._held is not None:
                status, reason, held = self._held
                framed = [h for h in held if h[0] != b"transfer-encoding"]
                framed.append((b"content-length", str(len(tail)).encode()))
                self.down.queue_response(status, reason, framed)
            if tail:
                self.down.queue_data(tail)
        self.down.queue_end()
        await self.down.flush()
