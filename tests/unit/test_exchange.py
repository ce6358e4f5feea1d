"""The HTTP exchange without sockets: its state table, and the session
driving it over trio memory streams against an in-memory h11 origin."""

from __future__ import annotations

import json
from collections.abc import Hashable

import h11
import pytest
import trio
import trio.testing

from proxy.http.conn import Downstream, Limits
from proxy.http.exchange import (
    TRANSITIONS,
    Ev,
    Exchange,
    LocalProtocolError,
    RequestOutcome,
    State,
    classify,
)
from proxy.http.pool import UpstreamPool
from proxy.http.routing import Routed
from proxy.http.session import HttpSession
from proxy.http.upstream import Upstream
from proxy.policy.verdict import RequestVerdict

# -- the table -------------------------------------------------------------------


def _walk(*events: Ev) -> Exchange:
    x = Exchange(RequestOutcome("id", "GET", "/"))
    for event in events:
        x.on(event)
    return x


def test_an_allowed_exchange_walks_to_done_and_back_to_idle() -> None:
    x = _walk(
        Ev.REQUEST_HEAD, Ev.ALLOWED, Ev.UPSTREAM_READY, Ev.RESPONSE_HEAD, Ev.RESPONSE_END, Ev.KEEP
    )
    assert x.history == [
        State.IDLE,
        State.ROUTING,
        State.CONNECTING,
        State.RELAYING,
        State.RESPONDING,
        State.DONE,
        State.IDLE,
    ]


def test_a_failure_before_the_answer_can_be_answered_after_it_cannot() -> None:
    before = _walk(Ev.REQUEST_HEAD, Ev.ALLOWED, Ev.UPSTREAM_READY, Ev.FAILED)
    assert before.state is State.ANSWERING and not before.answer_started
    after = _walk(Ev.REQUEST_HEAD, Ev.ALLOWED, Ev.UPSTREAM_READY, Ev.RESPONSE_HEAD, Ev.FAILED)
    assert after.state is State.CLOSED and after.answer_started


def test_a_body_first_verdict_routes_again() -> None:
    x = _walk(Ev.REQUEST_HEAD, Ev.NEED_BODY, Ev.BODY_READ, Ev.REFUSED, Ev.ANSWERED)
    assert x.state is State.DONE


@pytest.mark.parametrize(
    ("events", "bad"),
    [
        ((), Ev.RESPONSE_HEAD),  # an answer to nothing
        ((Ev.REQUEST_HEAD,), Ev.UPSTREAM_READY),  # an upstream before the verdict
        ((Ev.REQUEST_HEAD, Ev.REFUSED), Ev.ALLOWED),  # allowed after refusing
        ((Ev.REQUEST_HEAD, Ev.REFUSED, Ev.CLOSE), Ev.KEEP),  # reuse a closed connection
    ],
)
def test_an_event_out_of_order_is_our_bug(events: tuple[Ev, ...], bad: Ev) -> None:
    x = _walk(*events)
    with pytest.raises(LocalProtocolError):
        x.on(bad)


def test_every_state_but_closed_can_close_and_closed_is_final() -> None:
    for state in State:
        assert ((state, Ev.CLOSE) in TRANSITIONS) is (state is not State.CLOSED)
    assert not [key for key in TRANSITIONS if key[0] is State.CLOSED]


@pytest.mark.parametrize(
    ("decision", "reason", "expected"),
    [
        ("allow", "rule_matched", "served"),
        ("deny", "no_matching_rule", "denied"),
        ("deny", "bad_request", "client_error"),
        ("allow", "write_timeout", "client_error"),
        ("allow", "upstream_refused", "refused_by_upstream"),
        ("allow", "upstream_timeout", "upstream_error"),
        ("deny", "target_unreachable", "upstream_error"),
        ("deny", "bad_jsonrpc", "client_error"),
        ("deny", "rate_limited", "denied"),
    ],
)
def test_classify(decision: str, reason: str, expected: str) -> None:
    outcome = RequestOutcome("id", "GET", "/", decision=decision, reason=reason)
    assert classify(outcome) == expected


# -- the session over memory streams ----------------------------------------------


class PathRouter:
    """Allows GET and POST under /ok; everything else is refused."""

    def route(self, request: h11.Request, upgrade: bool) -> Routed:
        path = request.target.decode().split("?")[0]
        allowed = path.startswith("/ok") and request.method in (b"GET", b"POST", b"HEAD")
        return Routed(
            RequestVerdict(allowed, "rule_matched" if allowed else "no_matching_rule", None),
            path=path,
            key="origin",
            target=request.target,
        )


async def origin(stream: trio.abc.Stream, seen: list[tuple[bytes, bytes]]) -> None:
    """An h11 origin on the other end of a memory stream."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
            body = b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            seen.append((request.target, body))
            payload = json.dumps({"target": request.target.decode(), "len": len(body)}).encode()
            out = conn.send(
                h11.Response(status_code=200, headers=[("content-length", str(len(payload)))])
            )
            if request.method != b"HEAD":
                out += conn.send(h11.Data(data=payload))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            conn.start_next_cycle()
        else:
            return


async def run_session(raw: bytes) -> tuple[bytes, list[RequestOutcome], list[tuple[bytes, bytes]]]:
    """Feed ``raw`` to a session, then EOF; what the client got back."""
    limits = Limits()
    client, server = trio.testing.memory_stream_pair()
    records: list[RequestOutcome] = []
    seen: list[tuple[bytes, bytes]] = []
    async with trio.open_nursery() as nursery:

        async def connect(key: Hashable) -> Upstream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(origin, theirs, seen)
            return Upstream(ours, key, limits)

        pool = UpstreamPool(connect)
        session = HttpSession(
            Downstream(server, limits), PathRouter(), pool, limits, records.append
        )

        async def serve() -> None:
            await session.run()
            await server.aclose()  # what the listener does when a session ends

        nursery.start_soon(serve)
        await client.send_all(raw)
        await client.send_eof()
        received = b""
        with trio.fail_after(10):
            while data := await client.receive_some(65536):
                received += data
        nursery.cancel_scope.cancel()
    return received, records, seen


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, bytes]] = []
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, body = 0, b""
    while True:
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # the end of the stream after the last answer
            return out
        if isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, body))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return out
            conn.start_next_cycle()
        else:
            return out


async def test_keep_alive_exchanges_allowed_and_denied() -> None:
    raw, records, seen = await run_session(
        b"GET /ok/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /no HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /ok/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    answers = _responses(raw)
    assert [status for status, _ in answers] == [200, 403, 200]
    assert json.loads(answers[2][1]) == {"target": "/ok/up", "len": 5}
    assert seen == [(b"/ok/1", b""), (b"/ok/up", b"hello")]
    assert [(r.decision, r.outcome) for r in records] == [
        ("allow", "served"),
        ("deny", "denied"),
        ("allow", "served"),
    ]
    assert records[2].bytes_up == 5


async def test_a_malformed_head_is_answered_and_never_forwarded() -> None:
    raw, records, seen = await run_session(b"GET /ok HTTP/1.1\r\nHost: x\nX: y\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert seen == []
    [record] = records
    assert (record.reason, record.outcome) == ("bad_request", "client_error")


async def test_a_broken_chunked_body_is_a_400_the_origin_never_sees() -> None:
    raw, records, seen = await run_session(
        b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert seen == []
    assert records[0].reason == "bad_request"


async def test_head_gets_no_body() -> None:
    raw, records, _ = await run_session(b"HEAD /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"\r\n\r\n")  # a head, and nothing after it
    assert records[0].method == "HEAD"


async def _session_with(
    raw: bytes, *, accepting: bool
) -> tuple[bytes, list[RequestOutcome], list[str]]:
    """A session whose audit trail may be down; ``order`` interleaves the
    records emitted with the sends to the client."""
    limits = Limits()
    client, server = trio.testing.memory_stream_pair()
    records: list[RequestOutcome] = []
    order: list[str] = []

    pump = server.send_stream.send_all_hook  # moves the bytes to the client's side
    assert pump is not None

    async def sent() -> None:
        order.append("sent")
        await pump()

    server.send_stream.send_all_hook = sent

    def emit(outcome: RequestOutcome) -> None:
        order.append("record")
        records.append(outcome)

    async with trio.open_nursery() as nursery:

        async def connect(key: Hashable) -> Upstream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(origin, theirs, [])
            return Upstream(ours, key, limits)

        session = HttpSession(
            Downstream(server, limits), PathRouter(), UpstreamPool(connect), limits, emit
        )
        session.accepting = lambda: accepting

        async def serve() -> None:
            await session.run()
            await server.aclose()

        nursery.start_soon(serve)
        await client.send_all(raw)
        await client.send_eof()
        received = b""
        with trio.fail_after(10):
            while data := await client.receive_some(65536):
                received += data
        nursery.cancel_scope.cancel()
    return received, records, order


async def test_a_request_is_recorded_before_its_answer_is_released() -> None:
    raw, records, order = await _session_with(
        b"GET /ok/1 HTTP/1.1\r\nHost: x\r\n\r\n", accepting=True
    )
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and records[0].outcome == "served"
    assert order[0] == "record" and "sent" in order


async def test_no_audit_trail_no_service() -> None:
    raw, records, _ = await _session_with(b"GET /ok/1 HTTP/1.1\r\nHost: x\r\n\r\n", accepting=False)
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    [record] = records
    assert record.reason == "audit_unavailable"
