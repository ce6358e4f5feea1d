"""L4Listener in-process: relay, audit records, and bad input from the network."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.integration.tls_support import MemoryAudit, start_echo, start_listener
from tests.pki import Issued, TestCA


async def _agents_to_echo(
    nursery: trio.Nursery, hr: Issued, ca_a: TestCA, echo_port: int, audit: MemoryAudit
) -> int:
    """An inbound listener as hr, for any agent of a.org, in front of the echo server."""
    _, port = await start_listener(
        nursery,
        nursery,
        direction="inbound",
        issued=hr,
        cas=(ca_a,),
        patterns=["spiffe://a.org/agent/*"],
        target=("127.0.0.1", echo_port),
        audit=audit,
    )
    return port


def _client_ssl(issued: Issued | None, ca: TestCA, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # these tests judge the server's verdict on us
    if issued is not None:
        d = Path(tempfile.mkdtemp())
        cert, key = issued.write(d)
        ctx.load_cert_chain(cert, key)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


async def _tls_roundtrip(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(raw, ctx, server_hostname="localhost")
    async with stream:
        await stream.do_handshake()
        await stream.send_all(payload)
        got = b""
        while len(got) < len(payload):
            data = await stream.receive_some()
            if not data:
                break
            got += data
        return got


async def test_inbound_relays_and_audits(ca_a: TestCA, hr: Issued, payroll: Issued) -> None:
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        port = await _agents_to_echo(nursery, hr, ca_a, echo_port, audit)
        got = await _tls_roundtrip(port, _client_ssl(payroll, ca_a), b"hello through the pair")
        assert got == b"hello through the pair"
        with trio.fail_after(5):
            while not any(r["event"] == "connection.close" for r in audit.records()):
                await trio.sleep(0)  # yield to the handler task; no wall-clock wait
        nursery.cancel_scope.cancel()
    opened = next(r for r in audit.records() if r["event"] == "connection.open")
    closed = next(r for r in audit.records() if r["event"] == "connection.close")
    assert opened["decision"] == "allow" and opened["reason"] == "peer_allowed"
    assert opened["peer_id"] == "spiffe://a.org/agent/payroll"
    assert opened["local_id"] == "spiffe://a.org/svc/hr"
    assert opened["rule"] == "spiffe://a.org/agent/*"
    assert opened["peer_cert_serial"] == format(payroll.cert.serial_number, "x")
    assert opened["peer_cert_not_after"].endswith("Z")
    assert closed["bytes_up"] == len(b"hello through the pair")
    assert closed["bytes_down"] == len(b"hello through the pair")
    assert isinstance(closed["duration_ms"], int)
    for record in audit.records():
        assert record["direction"] == "inbound"
        assert record["ts"].endswith("Z")


async def test_handshake_deadline_closes_silent_client(
    ca_a: TestCA, hr: Issued, autojump_clock: trio.testing.MockClock
) -> None:
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        _, port = await start_listener(
            nursery,
            nursery,
            direction="inbound",
            issued=hr,
            cas=(ca_a,),
            patterns=["spiffe://a.org/**"],
            target=("127.0.0.1", 9),
            audit=audit,
            handshake_timeout=30,
        )
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        # The mock clock jumps to the deadline while everyone waits.
        assert await silent.receive_some() == b""
        await silent.aclose()
        nursery.cancel_scope.cancel()
    [refused] = audit.records()
    assert refused["event"] == "connection.refused"
    assert refused["reason"] == "handshake_timeout"
    assert refused["decision"] == "deny"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("garbage", "tls_error"),
        ("plain_http", "tls_error"),
        ("no_client_cert", "no_peer_certificate"),
        ("tls12_client", "tls_version_refused"),
        ("wrong_peer", "peer_not_allowed"),
        ("other_ca", "untrusted_chain"),
        ("expired_client", "certificate_expired"),
    ],
)
async def test_bad_clients_are_refused_and_service_continues(
    ca_a: TestCA, hr: Issued, payroll: Issued, name: str, reason: str
) -> None:
    import datetime as dt

    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        _, port = await start_listener(
            nursery,
            nursery,
            direction="inbound",
            issued=hr,
            cas=(ca_a,),
            patterns=["spiffe://a.org/agent/payroll"],
            target=("127.0.0.1", echo_port),
            audit=audit,
        )
        if name in ("garbage", "plain_http"):
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            await raw.send_all(
                b"\x00\xff" * 600 if name == "garbage" else b"GET / HTTP/1.1\r\n\r\n"
            )
            with trio.fail_after(5):
                while await raw.receive_some():
                    pass
            await raw.aclose()
        else:
            if name == "no_client_cert":
                ctx = _client_ssl(None, ca_a)
            elif name == "tls12_client":
                ctx = _client_ssl(payroll, ca_a, maximum_version=ssl.TLSVersion.TLSv1_2)
            elif name == "wrong_peer":
                ctx = _client_ssl(ca_a.issue("spiffe://a.org/agent/marketing"), ca_a)
            elif name == "other_ca":
                ctx = _client_ssl(
                    TestCA.create("a.org").issue("spiffe://a.org/agent/payroll"), ca_a
                )
            else:
                now = dt.datetime.now(dt.UTC)
                ctx = _client_ssl(
                    ca_a.issue(
                        "spiffe://a.org/agent/payroll",
                        not_before=now - dt.timedelta(hours=2),
                        not_after=now - dt.timedelta(hours=1),
                    ),
                    ca_a,
                )
            with pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
                with trio.fail_after(5):
                    got = await _tls_roundtrip(port, ctx, b"x")
                    if not got:
                        raise trio.BrokenResourceError("closed without data")
        # The listener still serves a good client afterwards.
        assert await _tls_roundtrip(port, _client_ssl(payroll, ca_a), b"ok") == b"ok"
        nursery.cancel_scope.cancel()
    refused = [r for r in audit.records() if r["event"] == "connection.refused"]
    assert [r["reason"] for r in refused] == [reason]
    assert refused[0]["decision"] == "deny"
    if name == "wrong_peer":
        assert refused[0]["peer_id"] == "spiffe://a.org/agent/marketing"
    if name == "expired_client":  # whose certificate it was, and when it expired
        assert refused[0]["peer_id"] == "spiffe://a.org/agent/payroll"
        assert refused[0]["peer_cert_serial"]
        assert refused[0]["peer_cert_not_after"] < refused[0]["ts"]


async def test_connection_limit(ca_a: TestCA, hr: Issued, payroll: Issued) -> None:
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        listener, port = await start_listener(
            nursery,
            nursery,
            direction="inbound",
            issued=hr,
            cas=(ca_a,),
            patterns=["spiffe://a.org/**"],
            target=("127.0.0.1", echo_port),
            audit=audit,
            max_connections=1,
        )
        held = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            while listener.active < 1:
                await trio.sleep(0)
        second = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await second.receive_some() == b""
        await second.aclose()
        await held.aclose()
        nursery.cancel_scope.cancel()
    reasons = [r["reason"] for r in audit.records() if r["event"] == "connection.refused"]
    assert "connection_limit" in reasons


async def test_outbound_pair_end_to_end(
    ca_a: TestCA, ca_b: TestCA, hr: Issued, payroll: Issued
) -> None:
    """outbound → inbound → echo, with the upstream's identity checked."""
    audit_in, audit_out = MemoryAudit(), MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        _, in_port = await start_listener(
            nursery,
            nursery,
            direction="inbound",
            issued=hr,
            cas=(ca_a,),
            patterns=["spiffe://a.org/agent/payroll"],
            target=("127.0.0.1", echo_port),
            audit=audit_in,
        )
        _, out_port = await start_listener(
            nursery,
            nursery,
            direction="outbound",
            issued=payroll,
            cas=(ca_a,),
            patterns=["spiffe://a.org/svc/hr"],
            target=("127.0.0.1", in_port),
            audit=audit_out,
        )
        _, wrong_port = await start_listener(
            nursery,
            nursery,
            direction="outbound",
            issued=payroll,
            cas=(ca_a,),
            patterns=["spiffe://a.org/svc/bank"],
            target=("127.0.0.1", in_port),
            audit=audit_out,
        )
        agent = await trio.open_tcp_stream("127.0.0.1", out_port)
        payload = bytes(range(256)) * 4096
        async with trio.open_nursery() as inner:

            async def send() -> None:
                await agent.send_all(payload)
                await agent.send_eof()

            inner.start_soon(send)
            got = bytearray()
            with trio.fail_after(10):
                while True:
                    data = await agent.receive_some()
                    if not data:
                        break
                    got += data
        assert bytes(got) == payload  # half-close passed through both legs
        await agent.aclose()
        refused = await trio.open_tcp_stream("127.0.0.1", wrong_port)
        with trio.fail_after(5):
            assert await refused.receive_some() == b""
        nursery.cancel_scope.cancel()
    out = audit_out.records()
    assert any(
        r["event"] == "connection.open" and r["peer_id"] == "spiffe://a.org/svc/hr" for r in out
    )
    deny = [r for r in out if r["event"] == "connection.refused"]
    assert deny and deny[0]["reason"] == "peer_not_allowed"
    assert deny[0]["peer_id"] == "spiffe://a.org/svc/hr"


async def test_queued_connections_are_all_served_and_the_port_closes_with_the_listener(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    # The accept loop takes up to a batch of queued connections per wake-up,
    # on a duplicate of the listening fd: more than one batch must all be
    # served, and stopping the listener must close both fds.
    import socket

    audit = MemoryAudit()
    async with trio.open_nursery() as outer:
        echo_port = await start_echo(outer)
        async with trio.open_nursery() as nursery:
            port = await _agents_to_echo(nursery, hr, ca_a, echo_port, audit)
            ctx = _client_ssl(payroll, ca_a)
            got: list[bytes] = []

            async def one(i: int) -> None:
                got.append(await _tls_roundtrip(port, ctx, b"req %d" % i))

            with trio.fail_after(10):
                async with trio.open_nursery() as clients:
                    for i in range(80):  # more than a batch (64) queue up before the loop runs
                        clients.start_soon(one, i)
                while sum(r["event"] == "connection.close" for r in audit.records()) < 80:
                    await trio.sleep(0)  # yield to the handlers; no wall-clock wait
            nursery.cancel_scope.cancel()
        assert sorted(got) == sorted(b"req %d" % i for i in range(80))
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
        outer.cancel_scope.cancel()


async def test_peers_that_alternate_keep_their_own_identity_in_records(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    # A listener keeps the rendered view of the last verified peer (shared
    # across handshakes of one chain): a different peer between two of the
    # same one must still get its own id, serial and expiry.
    billing = ca_a.issue("spiffe://a.org/agent/billing")
    audit = MemoryAudit()
    order = [payroll, payroll, billing, payroll]
    names = {
        id(payroll): "spiffe://a.org/agent/payroll",
        id(billing): "spiffe://a.org/agent/billing",
    }
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        port = await _agents_to_echo(nursery, hr, ca_a, echo_port, audit)
        for n, peer in enumerate(order, start=1):
            assert await _tls_roundtrip(port, _client_ssl(peer, ca_a), b"x") == b"x"
            with trio.fail_after(5):
                while sum(r["event"] == "connection.close" for r in audit.records()) < n:
                    await trio.sleep(0)  # yield to the handler task; no wall-clock wait
        nursery.cancel_scope.cancel()
    records = [r for r in audit.records() if r["event"] in ("connection.open", "connection.close")]
    assert len(records) == 2 * len(order)
    for peer, pair in zip(order, zip(records[::2], records[1::2], strict=True), strict=True):
        for record in pair:
            assert record["peer_id"] == names[id(peer)]
            assert record["peer_cert_serial"] == format(peer.cert.serial_number, "x")
            expected = peer.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S")
            assert record["peer_cert_not_after"].startswith(expected)
