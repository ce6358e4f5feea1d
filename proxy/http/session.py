"""One client connection's HTTP exchanges: parse, decide, forward, audit.

Theory of operation: :class:`HttpSession` reads one request at a time from
the client (:class:`Downstream`), asks the :class:`Router` what to do, and
either answers itself (a denial, a bad request) or relays the exchange to an
upstream connection taken from the pool. Bodies stream in both directions
without being buffered whole: the request body pump and the response relay
run as two tasks, so a large upload and an early response both work.

A request is checked before anything reaches the target: the head by the
strict framing checks, the path by the router, and whatever part of the body
is already buffered by h11 (so malformed chunked framing that arrives with
the head is a 400 that the target never sees).

Expect: 100-continue is answered by us once the request is allowed; the
upstream gets the body without the Expect field. A denied request that has
a body pending is answered with ``Connection: close`` and the connection
ends, so the unread body is never taken as the next request.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import h11
import trio

from proxy.http.conn import Downstream, Limits, PeerError, Upstream, linger_close, upstream_broken
from proxy.http.headers import (
    REQUEST_ID,
    Header,
    connection_tokens,
    forwardable,
    header_map,
    header_value,
    is_chunked,
    request_id_from,
)
from proxy.http.mcp_flow import AgentGuard, ResponseFilter
from proxy.http.policy import RequestDecision
from proxy.http.pool import UpstreamPool
from proxy.runtime.relay import RelayStats, relay

_REASON_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@dataclass
class Routed:
    """The router's answer for one request."""

    decision: RequestDecision
    path: str = ""
    key: Hashable | None = None  # pool key of the upstream; None when denied
    target: bytes = b""  # request-target to send upstream (origin-form)
    add_headers: Sequence[Header] = ()
    strip: frozenset[bytes] = frozenset()
    allow_upgrade: bool = False
    status: int = 403  # for denials
    label: str | None = None  # where it was going, for the audit record
    # Headers for the client either way (RateLimit, Retry-After).
    reply_headers: Sequence[Header] = ()
    audit: dict[str, object] = field(default_factory=dict)  # policy_version, dry_run...
    # Set when the decision needs the whole body first (a high-impact action
    # binds the body's hash): call with the SHA-256 hex of the body.
    finish: Callable[[str], Routed] | None = None
    max_body: int = 1 << 20
    mcp: AgentGuard | None = None  # protocol = "mcp" or "a2a": decide per JSON-RPC call


FilterFactory = Callable[[str], "ResponseFilter"]


def _filtered(step: Callable[[], bytes]) -> bytes:
    """Run a response filter step; what cannot be filtered is not passed on."""
    try:
        return step()
    except Exception as exc:  # a list answer we cannot read safely: fail closed
        raise PeerError(502, "unfilterable_response", str(exc)) from exc


class Router(Protocol):
    def route(self, request: h11.Request, upgrade: bool) -> Routed: ...


class UpstreamFailure(Exception):
    """Could not get an upstream connection (connect, TLS, identity)."""

    def __init__(self, status: int, reason: str, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.peer_id = peer_id


@dataclass
class RequestOutcome:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    decision: str = "deny"
    reason: str = ""
    rule: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_peer: str | None = None
    upstream_serial: str | None = None
    upstream_not_after: str | None = None
    error: str | None = None
    target: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    reply_headers: Sequence[Header] = ()
    calls: list[dict[str, object]] = field(default_factory=list)  # MCP: one per JSON-RPC call

    @property
    def duration_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


def _path_only(target: bytes) -> str:
    text = target.decode("ascii", "replace")
    if "://" in text:
        text = "/" + text.split("://", 1)[1].partition("/")[2]
    return text.split("?", 1)[0]


def _json_body(outcome: RequestOutcome, message: str) -> bytes:
    return json.dumps(
        {"error": message, "reason": outcome.reason, "request_id": outcome.request_id},
        separators=(",", ":"),
    ).encode()


class HttpSession:
    def __init__(
        self,
        downstream: Downstream,
        router: Router,
        pool: UpstreamPool,
        limits: Limits,
        emit: Callable[[RequestOutcome], None],
    ) -> None:
        self.down = downstream
        self.router = router
        self.pool = pool
        self.limits = limits
        self.emit = emit
        self.requests = 0
        # max_connection_lifetime, in trio time: no new exchange starts after it.
        self.lifetime_deadline = math.inf
        self.end_reason: str | None = None
        self.accepting: Callable[[], bool] = lambda: True  # the audit sink can write

    async def run(self) -> None:
        clean = await self._run()
        if not clean and self.down.h11.our_state in (h11.MUST_CLOSE, h11.DONE):
            # We answered and are ending the connection: let the answer land.
            await linger_close(self.down.stream)

    async def _run(self) -> bool:
        """True when the connection ended cleanly (peer closed or idle)."""
        while True:
            if trio.current_time() >= self.lifetime_deadline:
                self.end_reason = "max_lifetime"
                return True
            try:
                request = await self.down.next_request(self.lifetime_deadline)
            except PeerError as exc:
                if exc.status:
                    outcome = RequestOutcome(request_id=request_id_from(())[0], method="", path="")
                    outcome.reason = exc.reason
                    outcome.error = exc.message
                    self.down.before_release = partial(self._emit_once, outcome)
                    await self._answer(outcome, exc.status, exc.message, close=True)
                    if self.down.before_release is not None:  # nothing was released
                        self._emit_once(outcome)
                    return False
                self.end_reason = (
                    "max_lifetime" if trio.current_time() >= self.lifetime_deadline else exc.reason
                )
                return True
            if request is None:
                return True
            self.requests += 1
            keep = await self._exchange(request)
            if not keep or not self.down.reusable():
                return False
            self.down.h11.start_next_cycle()

    # -- answering ourselves ----------------------------------------------

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
        if self.down.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way; nothing more to say
        body = _json_body(outcome, message)
        headers: list[Header] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (REQUEST_ID, outcome.request_id.encode()),
            *extra,
        ]
        if close:
            headers.append((b"connection", b"close"))
        try:
            await self.down.send(
                h11.Response(
                    status_code=status, headers=headers, reason=_REASON_PHRASES.get(status, b"")
                )
            )
            await self.down.send(h11.Data(data=body))
            await self.down.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass

    # -- one exchange -----------------------------------------------------

    async def _exchange(self, request: h11.Request) -> bool:
        request_id, generated = request_id_from(request.headers)
        outcome = RequestOutcome(
            request_id=request_id,
            method=request.method.decode("ascii", "replace"),
            path=_path_only(request.target),
        )
        self.down.before_release = partial(self._emit_once, outcome)
        try:
            return await self._exchange_inner(request, outcome, generated)
        finally:
            if self.down.before_release is not None:  # no response was released
                self._emit_once(outcome)

    def _emit_once(self, outcome: RequestOutcome) -> None:
        """Emit the request's records (the listener commits them): from the
        flush that completes the response, before its last bytes leave."""
        self.down.before_release = None
        self.emit(outcome)

    async def _exchange_inner(
        self, request: h11.Request, outcome: RequestOutcome, generated_id: bool
    ) -> bool:
        if not self.accepting():  # fail closed: the audit trail cannot be written
            outcome.reason, outcome.error = "audit_unavailable", "audit trail unavailable"
            await self._answer(outcome, 503, "audit trail unavailable", close=True)
            return False
        upgrade = header_value(request.headers, b"upgrade") is not None or (
            b"upgrade" in connection_tokens(request.headers)
        )
        try:
            routed = self.router.route(request, upgrade)
        except PeerError as exc:
            outcome.reason, outcome.error = exc.reason, exc.message
            await self._answer(outcome, exc.status, exc.message, close=True)
            return False
        body_pending = self.down.h11.their_state is h11.SEND_BODY
        prefetched: list[h11.Data | h11.EndOfMessage] = []
        filter_factory: FilterFactory | None = None
        if routed.mcp is not None and routed.decision.reason != "connect_not_allowed":
            handled = await self._mcp_request(request, routed, outcome, body_pending)
            if isinstance(handled, bool):
                return handled
            prefetched, filter_factory = handled
            if request.method == b"POST":
                body_pending = False  # read whole for judging; GET/DELETE read as usual
        elif routed.finish is not None:
            try:
                body = await self._read_whole_body(routed.max_body) if body_pending else b""
            except PeerError as exc:
                outcome.reason, outcome.error = exc.reason, exc.message
                await self._answer(outcome, exc.status, exc.message, close=True)
                return False
            routed = routed.finish(hashlib.sha256(body).hexdigest())
            prefetched = [h11.Data(data=body), h11.EndOfMessage()] if body else []
            body_pending = False
        outcome.path = routed.path or outcome.path
        outcome.target = routed.label
        outcome.reason, outcome.rule = routed.decision.reason, routed.decision.rule
        outcome.extra.update(routed.audit)
        outcome.reply_headers = routed.reply_headers
        if not routed.decision.allowed:
            await self._answer(
                outcome, routed.status, "forbidden", close=body_pending, extra=routed.reply_headers
            )
            return not body_pending

        # Look at what is already buffered of the body before anything goes
        # upstream: malformed framing here is a 400 the target never sees.
        try:
            while body_pending:
                event = self.down.buffered_body_event()
                if event is None:
                    break
                prefetched.append(event)
                if isinstance(event, h11.EndOfMessage):
                    break
        except PeerError as exc:
            outcome.decision, outcome.reason, outcome.error = "deny", exc.reason, exc.message
            await self._answer(outcome, exc.status, exc.message, close=True)
            return False
        outcome.decision = "allow"
        body_complete = not body_pending or bool(
            prefetched and isinstance(prefetched[-1], h11.EndOfMessage)
        )
        if routed.finish is None and self.down.h11.their_state is not h11.SEND_BODY:
            body_complete = True

        headers = forwardable(
            request.headers,
            strip=routed.strip | {b"expect"},
            keep_upgrade=upgrade and routed.allow_upgrade,
        )
        if is_chunked(request.headers):
            headers.append((b"transfer-encoding", b"chunked"))
        headers.extend(routed.add_headers)
        if generated_id:
            headers.append((REQUEST_ID, outcome.request_id.encode()))
        upstream_request = h11.Request(method=request.method, target=routed.target, headers=headers)
        expect_continue = self.down.h11.they_are_waiting_for_100_continue

        try:
            up, first = await self._start_upstream(
                routed.key, upstream_request, prefetched, body_complete, outcome
            )
        except UpstreamFailure as exc:
            outcome.decision, outcome.reason, outcome.error = "deny", exc.reason, exc.message
            outcome.upstream_peer = exc.peer_id
            await self._answer(outcome, exc.status, exc.message, close=body_pending)
            return not body_pending
        except PeerError as exc:
            outcome.reason, outcome.error = exc.reason, exc.message
            await self._answer(outcome, exc.status, exc.message, close=True)
            return False
        outcome.upstream_peer, outcome.upstream_serial = up.peer_id, up.peer_serial
        outcome.upstream_not_after = up.peer_not_after
        if expect_continue and not body_complete and first is None:
            await self.down.send(h11.InformationalResponse(status_code=100, headers=[]))
        return await self._relay(
            up,
            prefetched if first is None else [],
            body_complete,
            first,
            outcome,
            upgrade and routed.allow_upgrade,
            filter_factory,
        )

    async def _mcp_request(
        self, request: h11.Request, routed: Routed, outcome: RequestOutcome, body_pending: bool
    ) -> bool | tuple[list[h11.Data | h11.EndOfMessage], FilterFactory | None]:
        """Judge an agent-protocol request (MCP, A2A). Returns True/False
        (keep-alive) when we answered it ourselves, else the body to forward
        and the filter for the answer."""
        guard = routed.mcp
        assert guard is not None
        headers = header_map(request.headers)
        path = routed.path
        if request.method != b"POST":
            if not routed.decision.allowed:
                return await self._refuse(outcome, routed, body_pending)
            if request.method == b"GET":
                return [], guard.stream_filter(headers, path)
            return [], None
        try:
            body = await self._read_whole_body(guard.max_body) if body_pending else b""
        except PeerError as exc:
            outcome.reason, outcome.error = exc.reason, exc.message
            await self._answer(outcome, exc.status, exc.message, close=True)
            return False
        verdict = guard.judge(body, headers, path)
        outcome.calls = verdict.calls
        outcome.reason, outcome.rule = verdict.reason, verdict.rule
        outcome.reply_headers = [(n.encode(), v.encode()) for n, v in verdict.headers]
        if not verdict.forward:
            outcome.decision = "deny"
            outcome.status = verdict.status
            outcome.bytes_up, outcome.bytes_down = len(body), len(verdict.body)
            await self._reply_json(outcome, verdict.status, verdict.body)
            return True
        routed.decision = RequestDecision(True, verdict.reason, verdict.rule)
        events: list[h11.Data | h11.EndOfMessage] = [h11.Data(data=body)] if body else []
        events.append(h11.EndOfMessage())
        return events, guard.answer_filter(verdict, headers, path)

    async def _refuse(self, outcome: RequestOutcome, routed: Routed, body_pending: bool) -> bool:
        outcome.reason, outcome.rule = routed.decision.reason, routed.decision.rule
        outcome.extra.update(routed.audit)
        await self._answer(
            outcome, routed.status, "forbidden", close=body_pending, extra=routed.reply_headers
        )
        return not body_pending

    async def _reply_json(self, outcome: RequestOutcome, status: int, body: bytes) -> None:
        headers: list[Header] = [(REQUEST_ID, outcome.request_id.encode()), *outcome.reply_headers]
        if body:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        else:
            headers.append((b"content-length", b"0"))
        self.down.queue(
            h11.Response(
                status_code=status, headers=headers, reason=_REASON_PHRASES.get(status, b"OK")
            )
        )
        if body:
            self.down.queue(h11.Data(data=body))
        await self.down.send(h11.EndOfMessage())

    async def _read_whole_body(self, limit: int) -> bytes:
        """The whole request body, for a decision that binds its hash."""
        if self.down.h11.they_are_waiting_for_100_continue:
            await self.down.send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self.down.next_body_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            size += len(event.data)
            if size > limit:
                raise PeerError(413, "body_too_large", f"request body over {limit} bytes")
            chunks.append(bytes(event.data))

    async def _start_upstream(
        self,
        key: Hashable | None,
        request: h11.Request,
        prefetched: list[h11.Data | h11.EndOfMessage],
        body_complete: bool,
        outcome: RequestOutcome,
    ) -> tuple[Upstream, h11.Response | h11.InformationalResponse | None]:
        """Send the head; with a complete small body, also send it and read the
        first response event, so a stale pooled connection can be retried once
        on a fresh one without the client noticing."""
        for attempt in (0, 1):
            up, reused = await self.pool.checkout(key)
            try:
                up.queue(request)
                if not (reused and body_complete):
                    return up, None  # the body pump sends the head with the body
                for event in prefetched:
                    up.queue(event)
                    if isinstance(event, h11.Data):
                        outcome.bytes_up += len(event.data)
                await up.flush()
                first = await up.next_event(self.limits.response_timeout)
                assert isinstance(first, (h11.Response, h11.InformationalResponse))
                return up, first
            except (trio.BrokenResourceError, trio.ClosedResourceError, PeerError) as exc:
                await self.pool.discard(up)
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

    async def _relay(
        self,
        up: Upstream,
        to_send: list[h11.Data | h11.EndOfMessage],
        body_complete: bool,
        first: h11.Response | h11.InformationalResponse | None,
        outcome: RequestOutcome,
        upgrade_allowed: bool,
        filter_factory: FilterFactory | None = None,
    ) -> bool:
        request_error: list[PeerError] = []
        response_filter: ResponseFilter | None = None
        held_head: h11.Response | None = None  # JSON answers are filtered whole
        response_started = False
        switched = False

        async def pump_request(cancel: trio.CancelScope) -> None:
            side = "upstream_reset"
            try:
                for event in to_send:
                    up.queue(event)
                    if isinstance(event, h11.Data):
                        outcome.bytes_up += len(event.data)
                if body_complete or self.down.h11.their_state is not h11.SEND_BODY:
                    await up.flush()
                    return
                while True:
                    side = "client_reset"
                    event = await self.down.next_body_event(before_wait=up.flush)
                    side = "upstream_reset"
                    up.queue(event)
                    if isinstance(event, h11.EndOfMessage):
                        await up.flush()
                        return
                    outcome.bytes_up += len(event.data)
            except PeerError as exc:
                request_error.append(exc)
                cancel.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if side == "upstream_reset":
                    request_error.append(upstream_broken(exc))
                else:
                    request_error.append(PeerError(0, side, str(exc)))
                cancel.cancel()

        async def relay_response(cancel: trio.CancelScope) -> None:
            nonlocal response_started, switched, held_head, response_filter
            event: h11.Response | h11.InformationalResponse | h11.Data | h11.EndOfMessage | None
            event = first
            while True:
                if event is None:
                    event = await up.next_event(
                        self.limits.response_timeout, before_wait=self.down.flush
                    )
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101 and upgrade_allowed:
                        response_started = True
                        outcome.status = 101
                        await self.down.send(
                            h11.InformationalResponse(
                                status_code=101,
                                headers=forwardable(event.headers, keep_upgrade=True),
                                reason=event.reason,
                            )
                        )
                        switched = True
                        cancel.cancel()
                        return
                    if event.status_code != 100:
                        await self.down.send(
                            h11.InformationalResponse(
                                status_code=event.status_code,
                                headers=forwardable(event.headers),
                                reason=event.reason,
                            )
                        )
                elif isinstance(event, h11.Response):
                    response_started = True
                    outcome.status = event.status_code
                    headers = forwardable(event.headers)
                    if is_chunked(event.headers):
                        headers.append((b"transfer-encoding", b"chunked"))
                    if header_value(headers, REQUEST_ID) is None:
                        headers.append((REQUEST_ID, outcome.request_id.encode()))
                    if trio.current_time() >= self.lifetime_deadline:
                        headers.append((b"connection", b"close"))  # the last exchange
                    headers.extend(outcome.reply_headers)
                    head = h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                    content_type = (
                        (header_value(event.headers, b"content-type") or b"")
                        .decode("latin-1")
                        .lower()
                    )
                    if filter_factory is not None and event.status_code == 200:
                        response_filter = filter_factory(content_type)
                        # The body changes length: re-frame it.
                        head = h11.Response(
                            status_code=event.status_code,
                            headers=[h for h in headers if h[0] != b"content-length"],
                            reason=event.reason,
                        )
                        if response_filter.sse is None:
                            held_head = head
                            event = None
                            continue
                    self.down.queue(head)
                elif isinstance(event, h11.Data):
                    if response_filter is not None:
                        out = _filtered(partial(response_filter.feed, bytes(event.data)))
                        outcome.bytes_down += len(out)  # what the client gets
                        if out:
                            self.down.queue(h11.Data(data=out))
                    else:
                        outcome.bytes_down += len(event.data)
                        self.down.queue(event)
                else:
                    if response_filter is not None:
                        tail = _filtered(response_filter.finish)
                        outcome.bytes_down += len(tail)
                        if held_head is not None:
                            framed = [h for h in held_head.headers if h[0] != b"transfer-encoding"]
                            framed.append((b"content-length", str(len(tail)).encode()))
                            self.down.queue(
                                h11.Response(
                                    status_code=held_head.status_code,
                                    headers=framed,
                                    reason=held_head.reason,
                                )
                            )
                        if tail:
                            self.down.queue(h11.Data(data=tail))
                    await self.down.send(h11.EndOfMessage())
                    if self.down.h11.their_state is h11.SEND_BODY:
                        cancel.cancel()  # response done before the request body: stop reading it
                    return
                event = None

        upstream_error: PeerError | None = None
        transport_error = False
        try:
            if body_complete or self.down.h11.their_state is not h11.SEND_BODY:
                # Nothing left to stream up (most requests): send, then relay
                # the answer in this task; a nursery per request costs more.
                with trio.CancelScope() as scope:
                    await pump_request(scope)
                    if not request_error:
                        await relay_response(scope)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump_request, nursery.cancel_scope)
                    nursery.start_soon(relay_response, nursery.cancel_scope)
        except PeerError as exc:
            upstream_error = exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            transport_error = True
            outcome.error = str(exc)
        except BaseExceptionGroup as group:
            peer, rest = group.split(PeerError)
            if rest is not None:
                _broken, other = rest.split((trio.BrokenResourceError, trio.ClosedResourceError))
                if other is not None:
                    raise other from None
                transport_error = True
            if peer is not None:
                upstream_error = peer.exceptions[0]  # type: ignore[assignment]

        if switched:
            await self._tunnel(up, outcome)
            return False
        if request_error:
            error = request_error[0]
            outcome.reason, outcome.error = error.reason, error.message
            await self.pool.discard(up)
            if error.status and not response_started:
                await self._answer(outcome, error.status, error.message, close=True)
            return False
        if upstream_error is not None:
            outcome.reason, outcome.error = upstream_error.reason, upstream_error.message
            await self.pool.discard(up)
            if not response_started:
                await self._answer(
                    outcome, upstream_error.status, upstream_error.message, close=True
                )
            return False
        if transport_error:  # the client went away while we answered
            outcome.reason = "client_reset"
            await self.pool.discard(up)
            return False
        await self.pool.checkin(up)
        return self.down.reusable()

    async def _tunnel(self, up: Upstream, outcome: RequestOutcome) -> None:
        """After a 101 the connection is no longer HTTP: relay raw bytes,
        starting with whatever either h11 had buffered past the handshake."""
        leftover_down = self.down.h11.trailing_data[0]
        leftover_up = up.h11.trailing_data[0]
        try:
            if leftover_down:
                await up.stream.send_all(leftover_down)
            if leftover_up:
                await self.down.stream.send_all(leftover_up)
            stats = RelayStats()
            await relay(self.down.stream, up.stream, stats)
            outcome.bytes_up += stats.bytes_up + len(leftover_down)
            outcome.bytes_down += stats.bytes_down + len(leftover_up)
        finally:
            await self.pool.discard(up)
