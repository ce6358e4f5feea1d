"""Continuous authentication: connections end when their lifetime runs out or
the peer's certificate expires; our own expired SVID fails closed. Time is a
trio MockClock that jumps ahead whenever every task is waiting."""

from __future__ import annotations

import datetime as dt
from typing import Any

import h11
import trio
import trio.testing

from proxy.identity import IdentitySnapshot, IdentityState
from proxy.netaddr import HostPort
from proxy.policy import parse_patterns
from proxy.runtime.l4 import L4Config, L4Listener
from tests.integration.http_support import client_context, read_response, start_inbound, tls_connect
from tests.integration.tls_support import MemoryAudit, snapshot, start_echo
from tests.pki import Issued, TestCA

PAYROLL = "spiffe://a.org/agent/payroll"


async def _l4(
    nursery: trio.Nursery, snap: IdentitySnapshot, target: int, audit: MemoryAudit, **kw: Any
) -> int:
    config = L4Config(
        "tcp-in",
        "inbound",
        HostPort("127.0.0.1", 0),
        HostPort("127.0.0.1", target),
        parse_patterns(["spiffe://a.org/**"]),
        **kw,
    )
    listener = L4Listener(config, IdentityState(snap), audit.sink)
    bound = await nursery.start(listener.serve, nursery)
    return int(bound[0].rpartition(":")[2])


async def _held_open_until_closed(port: int, client: Issued) -> float:
    """Connect, prove the relay works, then wait for the sidecar to end it."""
    stream = await tls_connect(port, client_context(client))
    await stream.send_all(b"ping")
    assert await stream.receive_some(10) == b"ping"
    start = trio.current_time()
    try:
        while await stream.receive_some(10):
            pass
    except trio.BrokenResourceError:
        pass
    return trio.current_time() - start


async def test_tcp_max_connection_lifetime(
    ca_a: TestCA, hr: Issued, autojump_clock: trio.testing.MockClock
) -> None:
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        port = await _l4(nursery, snapshot(hr, ca_a), echo, audit, max_connection_lifetime=300.0)
        held = await _held_open_until_closed(port, ca_a.issue(PAYROLL))
        nursery.cancel_scope.cancel()
    assert 290 <= held <= 310
    closed = [r for r in audit.records() if r["event"] == "connection.close"]
    assert closed[0]["reason"] == "max_lifetime"


async def test_connection_closed_when_peer_certificate_expires(
    ca_a: TestCA, hr: Issued, autojump_clock: trio.testing.MockClock
) -> None:
    now = dt.datetime.now(dt.UTC)
    short = ca_a.issue(
        PAYROLL, not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(seconds=600)
    )
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        port = await _l4(nursery, snapshot(hr, ca_a), echo, audit)
        held = await _held_open_until_closed(port, short)
        nursery.cancel_scope.cancel()
    assert 560 <= held <= 610
    closed = [r for r in audit.records() if r["event"] == "connection.close"]
    assert closed[0]["reason"] == "peer_certificate_expired"


async def test_own_expired_svid_fails_closed(ca_a: TestCA) -> None:
    now = dt.datetime.now(dt.UTC)
    expiring = ca_a.issue(
        "spiffe://a.org/svc/hr",
        not_before=now - dt.timedelta(hours=2),
        not_after=now - dt.timedelta(seconds=1),
    )
    snap = snapshot(expiring, ca_a)
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        port = await _l4(nursery, snap, 9, audit)
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await raw.receive_some(10) == b""  # nothing presented
        await raw.aclose()
        nursery.cancel_scope.cancel()
    [refused] = audit.records()
    assert refused["reason"] == "own_svid_expired" and refused["decision"] == "deny"


async def test_http_lifetime_waits_for_the_in_flight_exchange(
    ca_a: TestCA, hr: Issued, autojump_clock: trio.testing.MockClock
) -> None:
    """The lifetime passes while a slow response is in flight: the response
    still arrives whole (with Connection: close), then the connection ends."""

    async def slow_backend(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.EndOfMessage):
                break
        await trio.sleep(120)  # past the 60 s lifetime
        await stream.send_all(
            conn.send(h11.Response(status_code=200, headers=[("content-length", "4")]))
        )
        await stream.send_all(conn.send(h11.Data(data=b"done")))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        await stream.aclose()

    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, slow_backend, 0)
        backend_port = listeners[0].socket.getsockname()[1]
        _, port = await start_inbound(
            nursery,
            issued=hr,
            cas=(ca_a,),
            target_port=backend_port,
            audit=audit,
            rules=[{"peers": [PAYROLL], "methods": ["GET"], "paths": ["/**"]}],
            max_connection_lifetime=60,
            response_timeout=600,
        )
        stream = await tls_connect(port, client_context(ca_a.issue(PAYROLL)))
        await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: hr\r\n\r\n")
        status, headers, body = await read_response(stream, deadline=1000)
        assert (status, body) == (200, b"done")
        assert headers.get("connection") == "close"
        try:
            rest = await stream.receive_some(10)
        except trio.BrokenResourceError:
            rest = b""
        assert rest == b""
        nursery.cancel_scope.cancel()
    closed = [r for r in audit.records() if r["event"] == "connection.close"]
    assert closed[0]["reason"] == "max_lifetime" and closed[0]["requests"] == 1


async def test_http_idle_connection_ends_at_lifetime(
    ca_a: TestCA, hr: Issued, autojump_clock: trio.testing.MockClock
) -> None:
    from tests.integration.http_support import RecordingBackend

    audit = MemoryAudit()
    backend = RecordingBackend()
    async with trio.open_nursery() as nursery:
        await backend.start(nursery)
        _, port = await start_inbound(
            nursery,
            issued=hr,
            cas=(ca_a,),
            target_port=backend.port,
            audit=audit,
            rules=[{"peers": [PAYROLL], "methods": ["GET"], "paths": ["/**"]}],
            max_connection_lifetime=30,
            idle_timeout=600,
        )
        stream = await tls_connect(port, client_context(ca_a.issue(PAYROLL)))
        await stream.send_all(b"GET /a HTTP/1.1\r\nHost: hr\r\n\r\n")
        status, _, _ = await read_response(stream)
        start = trio.current_time()
        try:
            while await stream.receive_some(10):
                pass
        except trio.BrokenResourceError:
            pass
        waited = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert status == 200 and waited <= 31
    closed = [r for r in audit.records() if r["event"] == "connection.close"]
    assert closed[0]["reason"] == "max_lifetime"


def test_session_resumption_is_off(ca_a: TestCA, hr: Issued) -> None:
    """A resumed session would skip peer verification and could outlive the
    certificate it was opened with; we never offer tickets or a cache."""
    from OpenSSL import SSL

    from proxy.tls import build_side

    snap = snapshot(hr, ca_a)
    side = build_side(snap.svid, snap.bundles, lambda p: None, server=True)  # type: ignore[arg-type,return-value]
    assert side.context.get_session_cache_mode() == SSL.SESS_CACHE_OFF
    assert side.context.set_options(0) & SSL.OP_NO_TICKET
