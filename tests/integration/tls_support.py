"""In-process helpers: TLS sides from the test PKI, and listeners on port 0."""

from __future__ import annotations

import io
import json
from typing import Any

import trio

from proxy.audit import AuditSink
from proxy.identity import (
    IdentitySnapshot,
    IdentityState,
    TrustBundle,
    TrustBundleSet,
    TrustDomain,
    load_x509_svid,
)
from proxy.netaddr import HostPort
from proxy.policy import decide_peer, parse_patterns
from proxy.runtime.l4 import L4Config, L4Listener
from proxy.tls import TlsSide, TLSStream, build_side
from tests.pki import Issued, TestCA


def snapshot(issued: Issued, *cas: TestCA) -> IdentitySnapshot:
    svid = load_x509_svid(issued.cert_pem(), issued.key_pem())
    bundles = TrustBundleSet(
        TrustBundle.from_pem(TrustDomain.parse(ca.trust_domain), ca.bundle_pem()) for ca in cas
    )
    return IdentitySnapshot(svid=svid, bundles=bundles)


def side(
    issued: Issued,
    cas: tuple[TestCA, ...],
    patterns: list[str],
    *,
    server: bool,
    min_version: Any = "1.3",
) -> TlsSide:
    snap = snapshot(issued, *cas)
    pats = parse_patterns(patterns)
    return build_side(
        snap.svid,
        snap.bundles,
        lambda peer: decide_peer(peer, pats),
        server=server,
        min_version=min_version,
    )


def hr_and_payroll(ca: TestCA) -> tuple[TlsSide, TlsSide]:
    """(server, client): spiffe://a.org/svc/hr admitting agents, and the
    payroll agent expecting hr; for stream-level tests over real TLS."""
    server = side(ca.issue("spiffe://a.org/svc/hr"), (ca,), ["spiffe://a.org/agent/*"], server=True)
    client = side(
        ca.issue("spiffe://a.org/agent/payroll"), (ca,), ["spiffe://a.org/svc/hr"], server=False
    )
    return server, client


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(client, server) TCP streams on loopback."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    return client, server


async def tls_pair(sides: tuple[TlsSide, TlsSide]) -> tuple[TLSStream, TLSStream]:
    """(client, server) TLS streams on loopback, handshakes done."""
    client_tcp, server_tcp = await tcp_pair()
    server, client = TLSStream(server_tcp, sides[0]), TLSStream(client_tcp, sides[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return client, server


class MemoryAudit:
    """A real AuditSink writing to an in-memory text stream; parsed back."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.sink = AuditSink(self.buffer)

    def records(self) -> list[dict[str, Any]]:
        self.sink.flush()
        return [json.loads(line) for line in self.buffer.getvalue().splitlines()]


async def start_listener(
    nursery: trio.Nursery,
    handlers: trio.Nursery,
    *,
    direction: str,
    issued: Issued,
    cas: tuple[TestCA, ...],
    patterns: list[str],
    target: tuple[str, int],
    audit: MemoryAudit,
    handshake_timeout: float = 5.0,
    max_connections: int = 100,
    min_tls: Any = "1.3",
) -> tuple[L4Listener, int]:
    config = L4Config(
        name=f"test-{direction}",
        direction="inbound" if direction == "inbound" else "outbound",
        listen=HostPort("127.0.0.1", 0),
        target=HostPort(*target),
        patterns=parse_patterns(patterns),
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        min_tls=min_tls,
    )
    listener = L4Listener(config, IdentityState(snapshot(issued, *cas)), audit.sink)
    bound = await nursery.start(listener.serve, handlers)
    return listener, int(bound[0].rpartition(":")[2])


async def echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                await stream.send_eof()
                return
            await stream.send_all(data)


async def start_echo(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(trio.serve_tcp, echo_handler, 0)
    return int(listeners[0].socket.getsockname()[1])
