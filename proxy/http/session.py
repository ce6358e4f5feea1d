"""One client connection's HTTP exchanges: the trio driver.

Theory of operation: :class:`HttpSession` reads one request at a time from
the client (:class:`Downstream`), asks the :class:`Router` what to do, and
either answers itself (a denial, a bad request) or relays the exchange to an
upstream connection taken from the pool (:class:`~proxy.http.relay.Relay`).
Each step is reported to the request's :class:`~proxy.http.exchange.Exchange`,
whose table says which step may follow which; the audit record is the
exchange's outcome.

A request is checked before anything reaches the target: the head by the
strict framing checks, the path by the router, and whatever part of the body
is already buffered (so malformed chunked framing that arrives with the head
is a 400 that the target never sees).

Expect: 100-continue is answered by us once the request is allowed; the
upstream gets the body without the Expect field. A denied request that has
a body pending is answered with ``Connection: close`` and the connection
ends, so the unread body is never taken as the next request.

An agent-protocol hook (:mod:`proxy.http.agent_hook`) judges POST bodies
whole and may filter answers; the session never names a protocol.

Each request is a span of the listener's :class:`~proxy.tracing.hop.Hop`:
the caller's W3C trace context is its parent (none: a new trace starts),
the upstream gets our span's context instead of the client's, the request's
records carry its ids and the span ends when they are emitted. Export, when
on, happens on the tracer's own thread, never here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import trio

from proxy.http.agent_hook import FilterFactory
from proxy.http.answers import CONTINUE, error_answer, path_only
from proxy.http.conn import Downstream, Limits, linger_close
from proxy.http.exchange import (
    CONNECTION_ENDERS,
    UPSTREAM_ERRORS,
    Ev,
    Exchange,
    PeerError,
    RequestOutcome,
    State,
    classify,
)
from proxy.http.headers import (
    Header,
    connection_tokens,
    request_id_from,
    trailer_fields,
)
from proxy.http.hooked import hooked_request
from proxy.http.pool import UpstreamPool
from proxy.http.relay import BodyEvent, DirectBody, Relay
from proxy.http.routing import Routed, Router, UpstreamFailure, upstream_request_for
from proxy.http.upstream import RawRelay, Upstream, start_upstream, tunnel
from proxy.http.wire import Body, End, Request
from proxy.tracing.context import outgoing
from proxy.tracing.export import Span, Tracer
from proxy.tracing.hop import TRACE_FIELDS, Hop, record_ids

Answered = bool  # keep the connection after our own answer
_INF = math.inf


def _asks_upgrade(request: Request) -> bool:
    """An Upgrade field, or Connection naming upgrade. The parser's set of
    names answers for the fields that are not there (most requests)."""
    names = request.names
    if names is None:
        names = frozenset(name for name, _ in request.headers)
    return b"upgrade" in names or (
        b"connection" in names and b"upgrade" in connection_tokens(request.headers)
    )


class HttpSession:
    def __init__(
        self,
        downstream: Downstream,
        router: Router,
        pool: UpstreamPool,
        limits: Limits,
        emit: Callable[[RequestOutcome], None],
        *,
        raw_relay: RawRelay | None = None,
    ) -> None:
        self.down = downstream
        self.router = router
        self.pool = pool
        self.limits = limits
        self.emit = emit
        self.raw_relay = raw_relay  # after a 101: the runtime's byte relay
        self.requests = 0
        # max_connection_lifetime, in trio time: no new exchange starts after it.
        self.lifetime_deadline = math.inf
        self.end_reason: str | None = None
        self._method = b""  # of the exchange under way: a HEAD answer has no body
        self._strip: frozenset[bytes] = frozenset()  # identity headers, for trailers
        self.accepting: Callable[[], bool] = lambda: True  # the audit sink can write
        self.hop = Hop()  # tracing: the listener's tracer and who we and the peer are
        # A high-impact request's decision record, made durable (fsynced with
        # durability = "fsync") before it is forwarded; False: 503.
        self.decision_durable: Callable[[RequestOutcome], Awaitable[bool]] | None = None
        # Moves a large Content-Length answer socket to socket (the runtime's reactor).
        self.direct: DirectBody | None = None

    def trace(
        self, tracer: Tracer, server: bool, local_id: str, peer_id: str | None = None
    ) -> None:
        """Make this connection's requests spans of ``tracer``: server spans
        inbound (``peer_id``: the verified caller), client spans at the egress."""
        self.hop = Hop(tracer, server, local_id, peer_id)

    async def run(self) -> None:
        clean = await self._run()
        if not clean and self.down.cycle.answered and not self.down.may_close_at_once():
            # We answered and are ending the connection: let the answer land.
            await linger_close(self.down.stream)

    async def _run(self) -> bool:
        """True when the connection ended cleanly (peer closed or idle)."""
        while True:
            # No max_connection_lifetime (inf): no clock to read.
            if self.lifetime_deadline < _INF and trio.current_time() >= self.lifetime_deadline:
                self.end_reason = "max_lifetime"
                return True
            try:
                request = await self.down.next_request(self.lifetime_deadline)
            except PeerError as exc:
                if exc.status:
                    x = Exchange(RequestOutcome(request_id_from(())[0], method="", path=""))
                    x.outcome.failed(exc)
                    span = self.hop.start("")  # no context to read: a trace of its own
                    x.outcome.extra.update(record_ids(span))
                    self.down.before_release = partial(self._emit, x, span)
                    await self.refuse(x, exc.status, exc.message, close=True)
                    if self.down.before_release is not None:  # nothing was released
                        self._emit(x, span)
                    return False
                self.end_reason = (
                    "max_lifetime" if trio.current_time() >= self.lifetime_deadline else exc.reason
                )
                return True
            if request is None:
                return True
            self.requests += 1
            x = await self._exchange(request)
            if x.outcome.reason in CONNECTION_ENDERS:
                self.end_reason = x.outcome.reason  # the close record says why, too
            keep = x.state is State.DONE and self.down.cycle.reusable
            if x.state is not State.CLOSED:
                x.on(Ev.KEEP if keep else Ev.CLOSE)
            if not keep:
                return False
            self.down.start_next_cycle()

    def _emit(self, x: Exchange, span: Span) -> None:
        """Emit the request's records (the listener commits them), once: from
        the flush that completes the answer, before its last bytes leave, or
        at the end of the exchange when no answer was released. The span
        ends with them."""
        self.down.before_release = None
        outcome = x.outcome
        outcome.outcome = classify(outcome)
        if outcome.calls:
            ids = record_ids(span)
            for call in outcome.calls:
                call.update(ids)
        self.emit(outcome)
        if span.otel is not None:  # export on: the span carries the record's facts
            failed = outcome.outcome in ("upstream_error", "client_error") or outcome.status >= 500
            self.hop.end(
                span,
                {
                    "decision": outcome.decision,
                    "reason": outcome.reason,
                    "rule": outcome.rule,
                    "method": outcome.method,
                    "path": outcome.path,
                    "status": outcome.status,
                    # outbound: the upstream we verified is the peer
                    **({"peer_id": outcome.upstream_peer} if outcome.upstream_peer else {}),
                },
                outcome.calls,
                error=(outcome.error or outcome.reason) if failed else None,
            )

    # -- answering ourselves ----------------------------------------------

    async def refuse(
        self,
        x: Exchange,
        status: int,
        message: str,
        *,
        close: bool,
        extra: Sequence[Header] = (),
    ) -> Answered:
        """Answer with our own error; REFUSED, then ANSWERED (or CLOSE)."""
        if x.state is not State.ANSWERING:
            x.on(Ev.REFUSED)
        await self._answer(x.outcome, status, message, close=close, extra=extra)
        x.on(Ev.CLOSE if close else Ev.ANSWERED)
        return not close

    async def _answer(
        self,
        outcome: RequestOutcome,
        status: int,
        message: str,
        *,
        close: bool,
        extra: Sequence[Header] = (),
    ) -> None:
        outcome.status = status
        if not status or not self.down.cycle.may_answer:
            return  # the client left, or a response is already under way
        head, body = error_answer(outcome, status, message, close=close, extra=tuple(extra))
        try:
            self.down.queue(head)
            if self._method != b"HEAD":
                self.down.queue(Body(body))
            await self.down.send(End())
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            PeerError,  # write_timeout: the client does not read its answer
        ):
            pass

    # -- one exchange -----------------------------------------------------

    async def _exchange(self, request: Request) -> Exchange:
        request_id, generated = request_id_from(request.headers)
        self._method = request.method
        self._strip = frozenset()
        x = Exchange(
            RequestOutcome(
                request_id=request_id,
                method=request.method.decode("ascii", "replace"),
                path=path_only(request.target),
            )
        )
        x.on(Ev.REQUEST_HEAD)
        span = self.hop.start(x.outcome.method, request.headers, request.names)
        x.outcome.extra.update(record_ids(span))
        self.down.before_release = partial(self._emit, x, span)
        try:
            if not self.accepting():  # fail closed: the audit trail cannot be written
                x.outcome.reason = "audit_unavailable"
                x.outcome.error = "audit trail unavailable"
                await self.refuse(x, 503, "audit trail unavailable", close=True)
            else:
                await self._judge_and_forward(request, x, generated, span)
        finally:
            if self.down.before_release is not None:  # no answer was released
                self._emit(x, span)
        return x

    async def _judge_and_forward(
        self, request: Request, x: Exchange, generated_id: bool, span: Span
    ) -> None:
        outcome = x.outcome
        upgrade = _asks_upgrade(request)
        try:
            routed = self.router.route(request, upgrade)
        except PeerError as exc:
            outcome.failed(exc)
            await self.refuse(x, exc.status, exc.message, close=True)
            return
        body_pending = self.down.body_pending
        prefetched: list[BodyEvent] = []
        filter_factory: FilterFactory | None = None
        if routed.hook is not None and routed.decision.reason != "connect_not_allowed":
            handled = await hooked_request(self, request, routed, x, body_pending)
            if handled is None:
                return
            prefetched, filter_factory = handled
            if request.method == b"POST":
                body_pending = False  # read whole for judging; GET/DELETE read as usual
        elif routed.finish is not None:
            x.on(Ev.NEED_BODY)
            try:
                body = await self.down.read_whole_body(routed.max_body) if body_pending else b""
            except PeerError as exc:
                outcome.failed(exc)
                await self.refuse(x, exc.status, exc.message, close=True)
                return
            x.on(Ev.BODY_READ)
            routed = routed.finish(hashlib.sha256(body).hexdigest())
            prefetched = [Body(body)] if body else []
            prefetched.append(End())
            body_pending = False
        outcome.path = routed.path or outcome.path
        outcome.target = routed.label
        outcome.reason, outcome.rule = routed.decision.reason, routed.decision.rule
        outcome.extra.update(routed.decision.audit_fields())
        outcome.reply_headers = routed.decision.reply_headers()
        if not routed.decision.allowed:
            await self.deny(x, routed, body_pending)
            return

        # Look at what is already buffered of the body before anything goes
        # upstream: malformed framing here is a 400 the target never sees.
        x.on(Ev.ALLOWED)
        try:
            while body_pending:
                event = self.down.buffered_body_event()
                if event is None:
                    break
                prefetched.append(event)
                if isinstance(event, End):
                    break
        except PeerError as exc:
            outcome.decision = "deny"
            outcome.failed(exc)
            await self.refuse(x, exc.status, exc.message, close=True)
            return
        outcome.decision = "allow"
        durable = self.decision_durable
        if routed.high_impact and durable is not None and not await durable(outcome):
            outcome.decision, outcome.reason = "deny", "audit_unavailable"
            outcome.error = "the high-impact decision could not be made durable"
            await self.refuse(x, 503, "audit trail unavailable", close=True)
            return
        body_complete = not body_pending or bool(prefetched and isinstance(prefetched[-1], End))
        if not self.down.body_pending:
            body_complete = True
        # The upstream continues our span, not the client's: same trace id.
        routed.strip = routed.strip | TRACE_FIELDS
        upstream_request = upstream_request_for(
            request, routed, upgrade, generated_id, outcome, outgoing(span.context)
        )
        self._strip = routed.strip
        expect_continue = self.down.cycle.expect_continue
        try:
            up, first = await start_upstream(
                self.pool,
                routed.key,
                upstream_request,
                [self._upward(e) for e in prefetched] if prefetched else [],
                body_complete,
                outcome,
                self.limits.response_timeout,
            )
        except UpstreamFailure as exc:
            outcome.decision, outcome.reason, outcome.error = "deny", exc.reason, exc.message
            outcome.upstream_peer = exc.peer_id
            if exc.reason not in UPSTREAM_ERRORS and exc.reason != "upstream_refused":
                # The handshake went far enough for us to judge the upstream's
                # certificate, and we refused it.
                outcome.outcome = "upstream_untrusted"
            x.on(Ev.UPSTREAM_FAILED)
            await self.refuse(x, exc.status, exc.message, close=body_pending)
            return
        except PeerError as exc:
            outcome.failed(exc)
            x.on(Ev.UPSTREAM_FAILED)
            await self.refuse(x, exc.status, exc.message, close=True)
            return
        x.on(Ev.UPSTREAM_READY)
        outcome.upstream_peer, outcome.upstream_serial = up.peer_id, up.peer_serial
        outcome.upstream_not_after, outcome.upstream_addr = up.peer_not_after, up.peer_addr
        if expect_continue and not body_complete and first is None:
            await self.down.send(CONTINUE)
        run = Relay(
            self.down,
            up,
            self.limits,
            x,
            to_send=prefetched if first is None else [],
            body_complete=body_complete,
            first=first,
            upgrade_allowed=upgrade and routed.allow_upgrade,
            filter_factory=filter_factory,
            upward=self._upward,
            lifetime_deadline=self.lifetime_deadline,
            direct=self.direct,
        )
        await run.run()
        await self._relayed(run, up)

    async def _relayed(self, run: Relay, up: Upstream) -> None:
        """After the relay: pool the upstream or drop it, say what failed."""
        x, outcome = run.exchange, run.outcome
        if run.switched:
            await tunnel(self.down, up, self.pool, outcome, self.raw_relay)
            x.on(Ev.CLOSE)
            return
        error = run.request_error or run.upstream_error
        if error is not None:
            outcome.failed(error)
            await self.pool.discard(up)
            x.on(Ev.FAILED)
            if x.state is State.ANSWERING:  # nothing of an answer was sent yet
                await self.refuse(x, error.status, error.message, close=True)
            return
        if run.transport_error:  # the client went away while we answered
            outcome.reason = "client_reset"
            await self.pool.discard(up)
            x.on(Ev.FAILED)
            return
        x.on(Ev.RESPONSE_END)
        await self.pool.checkin(up)

    async def deny(self, x: Exchange, routed: Routed, body_pending: bool) -> None:
        body_pending = body_pending and not self.down.body_ended()
        await self.refuse(
            x,
            routed.decision.status,
            "forbidden",
            close=body_pending,
            extra=routed.decision.reply_headers(),
        )

    # -- request body -----------------------------------------------------

    def _upward(self, event: BodyEvent) -> BodyEvent:
        """A request body event as it goes upstream: trailers get the header
        rules, and nothing that frames, routes or identifies passes there."""
        if isinstance(event, End) and event.trailers:
            return End(trailer_fields(event.trailers, strip=self._strip))
        return event
