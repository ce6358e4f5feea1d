"""The runtime plan's TCP listeners, built from a parsed Config exactly as
``run`` and the L4 commands build them: max_connection_lifetime and
write_timeout reach the relay, a reload revokes a peer, and an upstream
that refuses our identity is reported as such."""

from __future__ import annotations

import contextlib
import ssl
import tempfile
from pathlib import Path
from typing import Any

import trio
import trio.testing

from proxy.config import Config, parse_config
from proxy.identity import IdentityState
from proxy.policy.gate import Gate
from proxy.runtime.listener import BaseListener
from proxy.runtime.plan import build_listeners
from proxy.runtime.reload import ConfigReloader
from tests.integration.http_support import client_context, tls_connect
from tests.integration.test_continuous_auth import _held_open_until_closed
from tests.integration.tls_support import MemoryAudit, snapshot, start_echo
from tests.pki import Issued, TestCA

HR = "spiffe://a.org/svc/hr"
PAYROLL = "spiffe://a.org/agent/payroll"
IDENTITY = {"source": "files", "cert": "c.pem", "key": "k.pem", "bundle": "b.pem"}


def _inbound_config(target: int, peers: list[str], **kw: Any) -> Config:
    inbound = {
        "name": "hr",
        "listen": "127.0.0.1:0",
        "target": f"127.0.0.1:{target}",
        "protocol": "tcp",
        "rules": [{"peers": peers}],
        **kw,
    }
    return parse_config({"identity": IDENTITY, "inbound": [inbound]}, "hr.toml")


async def _start(
    nursery: trio.Nursery, config: Config, issued: Issued, ca: TestCA, audit: MemoryAudit
) -> tuple[BaseListener, int]:
    state = IdentityState(snapshot(issued, ca))
    (listener,) = build_listeners(config, state, audit.sink, Gate(config.guard))
    bound = await nursery.start(listener.serve, nursery)
    return listener, int(bound[0].rpartition(":")[2])


async def test_tcp_max_connection_lifetime_from_config(
    ca_a: TestCA, autojump_clock: trio.testing.MockClock
) -> None:
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        config = _inbound_config(echo, [PAYROLL], max_connection_lifetime="5m")
        _, port = await _start(nursery, config, ca_a.issue(HR), ca_a, audit)
        held = await _held_open_until_closed(port, ca_a.issue(PAYROLL))
        nursery.cancel_scope.cancel()
    assert 290 <= held <= 310
    closed = [r for r in audit.records() if r["event"] == "connection.close"]
    assert closed[0]["reason"] == "max_lifetime"


async def _flood(stream: trio.SocketStream) -> None:
    # A target that answers far more than anyone reads.
    try:
        while True:
            await stream.send_all(b"x" * 65536)
    except trio.BrokenResourceError:
        pass


async def test_write_timeout_cuts_a_stalled_reader(
    ca_a: TestCA, autojump_clock: trio.testing.MockClock
) -> None:
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _flood, 0)
        target = listeners[0].socket.getsockname()[1]
        config = _inbound_config(target, [PAYROLL], write_timeout="30s")
        _, port = await _start(nursery, config, ca_a.issue(HR), ca_a, audit)
        stream = await tls_connect(port, client_context(ca_a.issue(PAYROLL)))
        await stream.send_all(b"go")
        started = trio.current_time()
        await trio.sleep(600)  # never read: the sidecar must give up on us
        nursery.cancel_scope.cancel()
    [closed] = [r for r in audit.records() if r["event"] == "connection.close"]
    assert closed["reason"] == "write_timeout" and closed["outcome"] == "client_error"
    assert "30s" in closed["error"] and closed["duration_ms"] >= 0
    assert trio.current_time() - started >= 30


async def test_reload_revokes_a_tcp_peer(ca_a: TestCA) -> None:
    audit = MemoryAudit()
    payroll = client_context(ca_a.issue(PAYROLL))
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        config = _inbound_config(echo, [PAYROLL])
        listener, port = await _start(nursery, config, ca_a.issue(HR), ca_a, audit)
        stream = await tls_connect(port, payroll)
        await stream.send_all(b"hi")
        assert await stream.receive_some(10) == b"hi"
        revoked = _inbound_config(echo, ["spiffe://a.org/agent/other"])
        reloader = ConfigReloader(lambda: revoked, config, [listener])
        assert reloader.reload("test")
        with trio.fail_after(10):
            refused = await tls_connect(port, payroll)
            # TLS 1.3: the client finishes first; the server's alert follows.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                assert await refused.receive_some(10) == b""
        nursery.cancel_scope.cancel()
    [refusal] = [r for r in audit.records() if r["event"] == "connection.refused"]
    assert refusal["reason"] == "peer_not_allowed" and refusal["peer_id"] == PAYROLL


async def test_upstream_refusing_our_identity_is_reported(ca_a: TestCA) -> None:
    hr_audit, payroll_audit = MemoryAudit(), MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        hr_config = _inbound_config(echo, ["spiffe://a.org/agent/other"])
        _, hr_port = await _start(nursery, hr_config, ca_a.issue(HR), ca_a, hr_audit)
        outbound = {
            "name": "to-hr",
            "listen": "127.0.0.1:0",
            "protocol": "tcp",
            "routes": [{"target": f"127.0.0.1:{hr_port}", "expect": [HR]}],
        }
        payroll_config = parse_config({"identity": IDENTITY, "outbound": [outbound]}, "p.toml")
        _, port = await _start(nursery, payroll_config, ca_a.issue(PAYROLL), ca_a, payroll_audit)
        agent = await trio.open_tcp_stream("127.0.0.1", port)
        await agent.send_all(b"hello")
        with trio.fail_after(10):
            while await agent.receive_some(100):
                pass
        await agent.aclose()
        nursery.cancel_scope.cancel()
    closed = [r for r in payroll_audit.records() if r["event"] == "connection.close"]
    assert closed[0]["reason"] == "refused_by_upstream", closed
    assert closed[0]["outcome"] == "refused_by_upstream"
    assert "upstream refused us" in closed[0]["error"]


async def test_tls12_upstream_refusing_us_in_the_handshake(ca_a: TestCA, ca_b: TestCA) -> None:
    """TLS 1.2: the upstream judges our certificate before the handshake ends."""
    hr = ca_a.issue(HR)
    directory = Path(tempfile.mkdtemp())
    cert, key = hr.write(directory)
    bundle = directory / "other-ca.pem"
    bundle.write_bytes(ca_b.bundle_pem())  # trusts someone else: refuses our SVID
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(bundle)
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def upstream(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
        await stream.aclose()

    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, upstream, 0)
        up_port = listeners[0].socket.getsockname()[1]
        outbound = {
            "name": "to-hr",
            "listen": "127.0.0.1:0",
            "protocol": "tcp",
            "min_tls": "1.2",
            "routes": [{"target": f"127.0.0.1:{up_port}", "expect": [HR]}],
        }
        config = parse_config({"identity": IDENTITY, "outbound": [outbound]}, "p.toml")
        _, port = await _start(nursery, config, ca_a.issue(PAYROLL), ca_a, audit)
        agent = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            while await agent.receive_some(100):
                pass
        await agent.aclose()
        nursery.cancel_scope.cancel()
    [refused] = [r for r in audit.records() if r["event"] == "connection.refused"]
    assert (
        refused["reason"] == "refused_by_upstream" and refused["outcome"] == "refused_by_upstream"
    )
    assert refused["decision"] == "allow" and refused["peer_id"] == HR
    assert "upstream refused us" in refused["error"]


async def test_listen_without_a_host_binds_every_address(ca_a: TestCA) -> None:
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        config = parse_config(
            {
                "identity": IDENTITY,
                "inbound": [
                    {
                        "name": "hr",
                        "listen": ":0",
                        "target": f"127.0.0.1:{echo}",
                        "protocol": "tcp",
                        "rules": [{"peers": [PAYROLL]}],
                    }
                ],
            },
            "hr.toml",
        )
        listener, port = await _start(nursery, config, ca_a.issue(HR), ca_a, audit)
        assert any(addr.startswith("0.0.0.0:") for addr in listener.bound), listener.bound
        stream = await tls_connect(port, client_context(ca_a.issue(PAYROLL)))
        await stream.send_all(b"hi")
        assert await stream.receive_some(10) == b"hi"
        nursery.cancel_scope.cancel()
