"""HTTP egress: forward-proxy routing, refusals, identity checks and pooling."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.integration.http_support import (
    RecordingBackend,
    read_response,
    start_inbound,
    start_outbound,
)
from tests.integration.tls_support import MemoryAudit
from tests.pki import Issued, TestCA

PAYROLL = "spiffe://a.org/agent/payroll"
HR = "spiffe://a.org/svc/hr"


@pytest.fixture
def hr(ca_a: TestCA) -> Issued:
    return ca_a.issue(HR)


class Pair:
    def __init__(
        self,
        backend: RecordingBackend,
        in_audit: MemoryAudit,
        out_audit: MemoryAudit,
        proxy_port: int,
        outbound: Any,
        upstream_port: int = 0,
    ) -> None:
        self.backend, self.in_audit, self.out_audit = backend, in_audit, out_audit
        self.proxy_port, self.outbound = proxy_port, outbound
        self.upstream_port = upstream_port  # the inbound sidecar the routes go to

    async def request(
        self, raw: bytes, method: bytes = b"GET"
    ) -> tuple[int, dict[str, str], bytes]:
        stream = await trio.open_tcp_stream("127.0.0.1", self.proxy_port)
        try:
            await stream.send_all(raw)
            return await read_response(stream, method)
        finally:
            await stream.aclose()

    def out_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.out_audit.records() if r["event"] == "http.request"]

    def inbound_handshakes(self) -> int:
        return sum(1 for r in self.in_audit.records() if r["event"] == "connection.open")


async def _pair(
    nursery: trio.Nursery,
    ca: TestCA,
    hr: Issued,
    payroll: Issued,
    extra_routes: list[dict[str, Any]] | None = None,
) -> Pair:
    backend = RecordingBackend()
    await backend.start(nursery)
    in_audit, out_audit = MemoryAudit(), MemoryAudit()
    _, in_port = await start_inbound(
        nursery,
        issued=hr,
        cas=(ca,),
        target_port=backend.port,
        audit=in_audit,
        rules=[
            {
                "name": "hr-reads",
                "peers": [PAYROLL],
                "methods": ["GET", "POST"],
                "paths": ["/timesheets/**"],
            }
        ],
    )
    routes = [
        {
            "name": "hr",
            "host": "hr-api",
            "target": f"127.0.0.1:{in_port}",
            "expect": [HR],
            "methods": ["GET", "POST"],
            "paths": ["/timesheets/**"],
        }
    ]
    for route in extra_routes or []:
        routes.append({**route, "target": f"127.0.0.1:{in_port}"})
    outbound, out_port = await start_outbound(
        nursery, issued=payroll, cas=(ca,), protocol="http-proxy", routes=routes, audit=out_audit
    )
    return Pair(backend, in_audit, out_audit, out_port, outbound, in_port)


async def test_forward_proxy_request_reaches_upstream(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        pair = await _pair(nursery, ca_a, hr, payroll)
        status, _, body = await pair.request(
            b"GET http://hr-api/timesheets/2026?x=1 HTTP/1.1\r\nHost: hr-api\r\n"
            b"Proxy-Connection: keep-alive\r\nX-Forwarded-Client-Cert: forged\r\n"
            b"Connection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    [seen] = pair.backend.seen
    assert seen.target == "/timesheets/2026?x=1"  # origin-form upstream
    assert seen.header("x-forwarded-client-cert")[0].endswith(f"URI={PAYROLL}")
    [record] = pair.out_requests()
    assert record["decision"] == "allow" and record["peer_id"] == HR
    assert record["direction"] == "outbound" and record["path"] == "/timesheets/2026"
    # peer_addr names the upstream this request went to; the agent is client_addr.
    assert record["peer_addr"] == f"127.0.0.1:{pair.upstream_port}"
    assert record["client_addr"].startswith("127.0.0.1:")
    assert json.loads(body)["target"] == "/timesheets/2026?x=1"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", "egress_not_allowed"),
        (b"CONNECT hr-api:443 HTTP/1.1\r\nHost: hr-api:443\r\n\r\n", "connect_not_allowed"),
        (b"DELETE http://hr-api/timesheets/1 HTTP/1.1\r\nHost: hr-api\r\n\r\n", "no_matching_rule"),
        (b"GET http://hr-api/admin HTTP/1.1\r\nHost: hr-api\r\n\r\n", "no_matching_rule"),
        (
            b"GET http://hr-api:8080/timesheets/1 HTTP/1.1\r\nHost: hr-api:8080\r\n\r\n",
            "egress_not_allowed",
        ),
    ],
    ids=["unknown-host", "connect", "method", "path", "other-port"],
)
async def test_egress_refusals(
    ca_a: TestCA, hr: Issued, payroll: Issued, raw: bytes, reason: str
) -> None:
    async with trio.open_nursery() as nursery:
        pair = await _pair(nursery, ca_a, hr, payroll)
        status, _, body = await pair.request(raw)
        nursery.cancel_scope.cancel()
    assert status == 403
    assert json.loads(body)["reason"] == reason
    assert pair.backend.seen == []
    assert pair.inbound_handshakes() == 0
    [record] = pair.out_requests()
    assert record["decision"] == "deny" and record["reason"] == reason


async def test_pooling_reuses_upstream_connections(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    requests = 20
    async with trio.open_nursery() as nursery:
        pair = await _pair(nursery, ca_a, hr, payroll)
        for i in range(requests):
            status, _, _ = await pair.request(
                f"GET http://hr-api/timesheets/{i} HTTP/1.1\r\nHost: hr-api\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            assert status == 200
        nursery.cancel_scope.cancel()
    assert len(pair.backend.seen) == requests
    assert pair.inbound_handshakes() <= 2  # far fewer mTLS handshakes than requests
    assert pair.outbound.pool.reuses >= requests - 2


async def test_routes_with_other_expectations_never_share(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    """Same upstream address, but the second route expects another identity:
    it must open (and refuse) its own connection, not reuse the first's."""
    bank_route = {
        "name": "bank",
        "host": "bank-api",
        "expect": ["spiffe://a.org/svc/bank"],
        "methods": ["GET"],
        "paths": ["/timesheets/**"],
    }
    async with trio.open_nursery() as nursery:
        pair = await _pair(nursery, ca_a, hr, payroll, extra_routes=[bank_route])
        ok, _, _ = await pair.request(
            b"GET http://hr-api/timesheets/1 HTTP/1.1\r\nHost: hr-api\r\nConnection: close\r\n\r\n"
        )
        refused, _, body = await pair.request(
            b"GET http://bank-api/timesheets/1 HTTP/1.1\r\n"
            b"Host: bank-api\r\nConnection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert ok == 200
    assert refused == 502 and json.loads(body)["reason"] == "peer_not_allowed"
    assert len(pair.backend.seen) == 1
    records = pair.out_requests()
    assert records[1]["reason"] == "peer_not_allowed" and records[1]["peer_id"] == HR


async def test_fixed_route_http_mode(ca_a: TestCA, hr: Issued, payroll: Issued) -> None:
    backend = RecordingBackend()
    async with trio.open_nursery() as nursery:
        await backend.start(nursery)
        _, in_port = await start_inbound(
            nursery,
            issued=hr,
            cas=(ca_a,),
            target_port=backend.port,
            audit=MemoryAudit(),
            rules=[{"peers": [PAYROLL], "methods": ["GET"], "paths": ["/**"]}],
        )
        _, port = await start_outbound(
            nursery,
            issued=payroll,
            cas=(ca_a,),
            protocol="http",
            audit=MemoryAudit(),
            routes=[
                {
                    "target": f"127.0.0.1:{in_port}",
                    "expect": [HR],
                    "methods": ["GET"],
                    "paths": ["/timesheets/**"],
                }
            ],
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n\r\n")
        first, _, _ = await read_response(stream)
        await stream.send_all(b"GET /other HTTP/1.1\r\nHost: hr\r\n\r\n")
        second, _, _ = await read_response(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert (first, second) == (200, 403)
    assert [s.target for s in backend.seen] == ["/timesheets/1"]
