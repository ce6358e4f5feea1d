"""A DNS route with ``client_cert = "svid"`` presents the current SVID: its
TLS side is rebuilt with each identity snapshot, as the SPIFFE sides are."""

from __future__ import annotations

from pathlib import Path

import trio
import trustme

from tests.integration.http_support import read_response, start_outbound
from tests.integration.oauth_support import Served, serve_https, server_context
from tests.integration.tls_support import MemoryAudit, snapshot
from tests.pki import TestCA


async def test_client_cert_svid_follows_rotation(tmp_path: Path, ca_a: TestCA) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    served = Served(0)
    peers: list[str | None] = []

    def handle(request: object, body: bytes, peer: str | None) -> tuple[int, bytes]:
        peers.append(peer)
        return 200, b"{}"

    ctx = server_context(ca.issue_cert("ledger.example"), ca_a)
    audit = MemoryAudit()
    async with serve_https(ctx, handle, served), trio.open_nursery() as nursery:
        route = {
            "name": "ledger",
            "target": f"127.0.0.1:{served.port}",
            "upstream_tls": "dns",
            "server_name": "ledger.example",
            "ca_file": str(tmp_path / "ca.pem"),
            "client_cert": "svid",
            "methods": ["GET"],
            "paths": ["/**"],
        }
        listener, port = await start_outbound(
            nursery,
            issued=ca_a.issue("spiffe://a.org/agent/payroll"),
            cas=(ca_a,),
            protocol="http",
            routes=[route],
            audit=audit,
            pool={"max_idle_per_route": 0},  # a new handshake per request
        )
        for rotated in (None, "spiffe://a.org/agent/payroll-v2"):
            if rotated is not None:
                listener.identity.swap(snapshot(ca_a.issue(rotated), ca_a))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /entries HTTP/1.1\r\nhost: ledger\r\n\r\n")
            status, _, _ = await read_response(stream)
            await stream.aclose()
            assert status == 200
        nursery.cancel_scope.cancel()
    assert peers == ["spiffe://a.org/agent/payroll", "spiffe://a.org/agent/payroll-v2"]
    assert served.sni == ["ledger.example", "ledger.example"]
