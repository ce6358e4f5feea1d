"""Rotation in-process: bundle changes take effect for new handshakes in
both directions (CA rollover, a trust domain added and dropped), open
connections carry on, and each handshake sees one whole snapshot."""

from __future__ import annotations

import ssl

import pytest
import trio

from proxy.identity import (
    IdentitySnapshot,
    IdentityState,
    TrustBundle,
    TrustBundleSet,
    TrustDomain,
    load_x509_svid,
)
from proxy.netaddr import HostPort
from proxy.policy import parse_patterns
from proxy.runtime.l4 import L4Config, L4Listener
from tests.integration.http_support import client_context, tls_connect
from tests.integration.tls_support import MemoryAudit, start_echo
from tests.pki import Issued, TestCA

A = TrustDomain.parse("a.org")
B = TrustDomain.parse("b.org")


def _snap(issued: Issued, *bundles: TrustBundle) -> IdentitySnapshot:
    return IdentitySnapshot(
        load_x509_svid(issued.cert_pem(), issued.key_pem()), TrustBundleSet(bundles)
    )


async def _ok(port: int, client: Issued) -> bool:
    try:
        stream = await tls_connect(port, client_context(client))
        await stream.send_all(b"hi")
        with trio.fail_after(5):
            got = await stream.receive_some(10)
        await stream.aclose()
        return got == b"hi"
    except (trio.BrokenResourceError, ssl.SSLError):
        return False


@pytest.fixture
def cas() -> tuple[TestCA, TestCA]:
    return TestCA.create("a.org"), TestCA.create("a.org")  # old and new root, same TD


async def test_ca_rollover_inbound(cas: tuple[TestCA, TestCA]) -> None:
    old, new = cas
    server_old = old.issue("spiffe://a.org/svc/hr")
    client_old = old.issue("spiffe://a.org/agent/payroll")
    client_new = new.issue("spiffe://a.org/agent/payroll")
    state = IdentityState(_snap(server_old, TrustBundle(A, (old.cert,))))
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        listener = L4Listener(
            L4Config(
                "in",
                "inbound",
                HostPort("127.0.0.1", 0),
                HostPort("127.0.0.1", echo),
                parse_patterns(["spiffe://a.org/**"]),
            ),
            state,
            audit.sink,
        )
        port = int((await nursery.start(listener.serve, nursery))[0].rpartition(":")[2])
        assert await _ok(port, client_old)
        assert not await _ok(port, client_new)

        # 1. The new CA joins the bundle: both generations are accepted.
        held = await tls_connect(port, client_context(client_old))
        state.swap(_snap(server_old, TrustBundle(A, (old.cert, new.cert))))
        assert await _ok(port, client_old) and await _ok(port, client_new)
        # 2. Leaves are reissued under the new CA (ours too).
        state.swap(_snap(new.issue("spiffe://a.org/svc/hr"), TrustBundle(A, (old.cert, new.cert))))
        assert await _ok(port, client_old) and await _ok(port, client_new)
        # 3. The old CA leaves the bundle: only now are old-CA leaves refused.
        state.swap(_snap(new.issue("spiffe://a.org/svc/hr"), TrustBundle(A, (new.cert,))))
        assert not await _ok(port, client_old)
        assert await _ok(port, client_new)
        # The connection opened before any of this carries on.
        await held.send_all(b"still")
        with trio.fail_after(5):
            assert await held.receive_some(10) == b"still"
        await held.aclose()
        nursery.cancel_scope.cancel()
    reasons = [r["reason"] for r in audit.records() if r["event"] == "connection.refused"]
    assert reasons == ["untrusted_chain", "untrusted_chain"]


async def test_trust_domain_added_and_dropped_outbound() -> None:
    """Outbound: an upstream in a federated trust domain is reachable only
    while that domain's bundle is loaded."""
    a, b = TestCA.create("a.org"), TestCA.create("b.org")
    upstream = b.issue("spiffe://b.org/svc/bank")
    agent = a.issue("spiffe://a.org/agent/payroll")
    up_state = IdentityState(_snap(upstream, TrustBundle(B, (b.cert,)), TrustBundle(A, (a.cert,))))
    out_state = IdentityState(_snap(agent, TrustBundle(A, (a.cert,))))
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        inbound = L4Listener(
            L4Config(
                "bank",
                "inbound",
                HostPort("127.0.0.1", 0),
                HostPort("127.0.0.1", echo),
                parse_patterns(["spiffe://a.org/**"]),
            ),
            up_state,
            MemoryAudit().sink,
        )
        in_port = int((await nursery.start(inbound.serve, nursery))[0].rpartition(":")[2])
        outbound = L4Listener(
            L4Config(
                "to-bank",
                "outbound",
                HostPort("127.0.0.1", 0),
                HostPort("127.0.0.1", in_port),
                parse_patterns(["spiffe://b.org/svc/bank"]),
            ),
            out_state,
            audit.sink,
        )
        out_port = int((await nursery.start(outbound.serve, nursery))[0].rpartition(":")[2])

        async def through() -> bool:
            stream = await trio.open_tcp_stream("127.0.0.1", out_port)
            try:
                await stream.send_all(b"pay")
                with trio.fail_after(5):
                    got = await stream.receive_some(10)
            except trio.BrokenResourceError:
                got = b""  # refused: the sidecar closed with our bytes unread
            await stream.aclose()
            return got == b"pay"

        assert not await through()  # b.org unknown: untrusted
        out_state.swap(_snap(agent, TrustBundle(A, (a.cert,)), TrustBundle(B, (b.cert,))))
        assert await through()
        out_state.swap(_snap(agent, TrustBundle(A, (a.cert,))))
        assert not await through()
        nursery.cancel_scope.cancel()
    reasons = [r["reason"] for r in audit.records() if r["event"] == "connection.refused"]
    assert reasons == ["untrusted_chain", "untrusted_chain"]
