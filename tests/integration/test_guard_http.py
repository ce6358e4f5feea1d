"""The guard in the HTTP relay: deny over allow, dry-run, rates (429 with the
IETF headers), quarantine and release, and step-up approvals bound to the
exact request."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

import trio

from proxy.config import parse_config
from proxy.identity import IdentityState, SpiffeId, load_x509_svid
from proxy.policy.approval import mint_approval
from proxy.policy.gate import Gate
from proxy.runtime.http_listeners import HttpInboundListener
from tests.integration.http_support import (
    RecordingBackend,
    client_context,
    identity_section,
    read_response,
    tls_connect,
)
from tests.integration.tls_support import MemoryAudit, snapshot
from tests.pki import Issued, TestCA

PAYROLL = "spiffe://a.org/agent/payroll"
APPROVER = "spiffe://a.org/approver/alice"


class Env:
    def __init__(
        self, port: int, audit: MemoryAudit, backend: RecordingBackend, gate: Gate, client: Issued
    ) -> None:
        self.port, self.audit, self.backend, self.gate, self.client = (
            port,
            audit,
            backend,
            gate,
            client,
        )

    async def request(
        self, raw: bytes, method: bytes = b"GET"
    ) -> tuple[int, dict[str, str], bytes]:
        stream = await tls_connect(self.port, client_context(self.client))
        try:
            await stream.send_all(raw)
            return await read_response(stream, method)
        finally:
            await stream.aclose()

    def records(self) -> list[dict[str, Any]]:
        return [r for r in self.audit.records() if r["event"] == "http.request"]


async def _env(
    nursery: trio.Nursery,
    ca: TestCA,
    hr: Issued,
    client: Issued,
    rules: list[dict[str, Any]],
    guard: dict[str, Any] | None = None,
) -> Env:
    backend = RecordingBackend()
    await backend.start(nursery)
    doc: dict[str, Any] = {
        "identity": identity_section(),
        "inbound": [
            {
                "name": "hr-api",
                "listen": "127.0.0.1:0",
                "protocol": "http",
                "target": f"127.0.0.1:{backend.port}",
                "rules": rules,
            }
        ],
    }
    if guard:
        doc["guard"] = guard
    config = parse_config(doc)
    gate = Gate(config.guard)
    audit = MemoryAudit()
    listener = HttpInboundListener(
        config.inbound[0], IdentityState(snapshot(hr, ca)), audit.sink, gate
    )
    bound = await nursery.start(listener.serve, nursery)
    env = Env(int(bound[0].rpartition(":")[2]), audit, backend, gate, client)
    env.listener = listener
    return env


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: hr\r\nConnection: close\r\n\r\n".encode()


async def test_deny_overrides_allow_and_dry_run_is_reported(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    rules = [
        {"name": "read-all", "peers": [PAYROLL], "methods": ["GET"], "paths": ["/**"]},
        {
            "name": "no-salaries",
            "peers": [PAYROLL],
            "methods": ["GET"],
            "paths": ["/salaries/**"],
            "action": "deny",
        },
        {
            "name": "try-no-exports",
            "peers": [PAYROLL],
            "methods": ["GET"],
            "paths": ["/timesheets/export"],
            "action": "deny",
            "mode": "dry-run",
        },
    ]
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, ca_a, hr, payroll, rules)
        denied, _, body = await env.request(_get("/salaries/2026"))
        allowed, _, _ = await env.request(_get("/timesheets/export"))
        nursery.cancel_scope.cancel()
    assert denied == 403 and json.loads(body)["reason"] == "denied_by_rule"
    assert allowed == 200  # a dry-run deny never changes the outcome
    first, second = env.records()
    assert first["rule"] == "no-salaries" and first["reason"] == "denied_by_rule"
    assert second["dry_run"] == [{"rule": "try-no-exports", "outcome": "would_deny"}]
    assert first["policy_version"].startswith("sha256:")
    assert first["policy_version"] == second["policy_version"]
    assert [s.target for s in env.backend.seen] == ["/timesheets/export"]


async def test_rate_limit_answers_429_with_headers(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    rules = [
        {
            "name": "reads",
            "peers": [PAYROLL],
            "methods": ["GET"],
            "paths": ["/**"],
            "rate": "2/minute",
        }
    ]
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, ca_a, hr, payroll, rules)
        results = [await env.request(_get(f"/t/{i}")) for i in range(3)]
        nursery.cancel_scope.cancel()
    assert [r[0] for r in results] == [200, 200, 429]
    _status, headers, body = results[2]
    assert int(headers["retry-after"]) >= 1
    assert headers["ratelimit-policy"] == '"reads";q=2;w=60'
    assert headers["ratelimit"].startswith('"reads";r=0;t=')
    assert "ratelimit" in results[0][1]  # allowed responses carry the quota too
    assert json.loads(body)["reason"] == "rate_limited"
    assert len(env.backend.seen) == 2


async def test_quarantine_trips_on_a_burst_of_denials_and_can_be_released(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    rules = [{"name": "reads", "peers": [PAYROLL], "methods": ["GET"], "paths": ["/ok/**"]}]
    guard = {"quarantine_for": "10m", "deny_burst": {"count": 3, "window": "1m"}}
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, ca_a, hr, payroll, rules, guard)
        for i in range(3):
            assert (await env.request(_get(f"/secret/{i}")))[0] == 403
        status, _, body = await env.request(_get("/ok/1"))  # allowed by policy, but...
        assert status == 403 and json.loads(body)["reason"] == "quarantined"
        [entry] = env.gate.quarantine.list()
        assert str(entry.peer) == PAYROLL and entry.reason == "deny_burst"
        assert env.gate.quarantine.release(SpiffeId.parse(PAYROLL))
        assert (await env.request(_get("/ok/2")))[0] == 200
        nursery.cancel_scope.cancel()
    reasons = [r["reason"] for r in env.records()]
    assert reasons[-2:] == ["quarantined", "rule_matched"]
    tripped = [r for r in env.records() if r.get("quarantine_reason")]
    assert tripped and tripped[0]["quarantine_reason"] == "deny_burst"


async def test_high_impact_needs_a_bound_single_use_approval(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    approver = ca_a.issue(APPROVER)
    approver_svid = load_x509_svid(approver.cert_pem(), approver.key_pem())
    rules = [
        {
            "name": "payments",
            "peers": [PAYROLL],
            "methods": ["POST"],
            "paths": ["/payments"],
            "high_impact": {"approvers": ["spiffe://a.org/approver/*"]},
        }
    ]
    body = b'{"employee":"ada","amount":12000}'

    def post(payload: bytes, token: str | None) -> bytes:
        head = (
            f"POST /payments HTTP/1.1\r\nHost: bank\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n"
        )
        if token:
            head += f"Agent-Approval: {token}\r\n"
        return head.encode() + b"\r\n" + payload

    token = mint_approval(
        approver_svid,
        SpiffeId.parse(PAYROLL),
        "POST",
        "/payments",
        hashlib.sha256(body).hexdigest(),
        now=dt.datetime.now(dt.UTC),
        ttl=120,
    )
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, ca_a, hr, payroll, rules)
        missing = await env.request(post(body, None), b"POST")
        other = await env.request(post(body.replace(b"12000", b"99000"), token), b"POST")
        ok = await env.request(post(body, token), b"POST")
        replay = await env.request(post(body, token), b"POST")
        nursery.cancel_scope.cancel()
    assert missing[0] == 403 and json.loads(missing[2])["reason"] == "approval_missing"
    assert other[0] == 403 and json.loads(other[2])["reason"] == "approval_mismatch"
    assert ok[0] == 200
    assert replay[0] == 403 and json.loads(replay[2])["reason"] == "approval_replayed"
    assert [s.body for s in env.backend.seen] == [body]


async def test_dry_run_is_counted_and_quarantines_are_managed_on_the_admin_endpoint(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    from proxy.metrics import Metrics
    from proxy.netaddr import HostPort
    from proxy.runtime.admin import AdminServer
    from proxy.runtime.gate import install_guard_routes

    rules = [
        {"name": "reads", "peers": [PAYROLL], "methods": ["GET"], "paths": ["/ok/**"]},
        {
            "name": "try-deny-ok",
            "peers": [PAYROLL],
            "methods": ["GET"],
            "paths": ["/ok/**"],
            "action": "deny",
            "mode": "dry-run",
        },
    ]
    guard = {"quarantine_for": "10m", "deny_burst": {"count": 2, "window": "1m"}}

    async def admin_call(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            f"{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
        await stream.aclose()
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), payload

    async with trio.open_nursery() as nursery:
        env = await _env(nursery, ca_a, hr, payroll, rules, guard)
        metrics = Metrics()
        admin = AdminServer(HostPort("127.0.0.1", 0), metrics, lambda: (True, "ready"))
        install_guard_routes(admin, env.gate)
        admin_port = int((await nursery.start(admin.serve)).rpartition(":")[2])
        env.listener.metrics = metrics  # the listener reports into the admin's metrics
        assert (await env.request(_get("/ok/1")))[0] == 200
        for i in range(2):
            assert (await env.request(_get(f"/no/{i}")))[0] == 403
        status, listed = await admin_call(admin_port, "GET", "/guard/quarantines")
        assert status == 200 and json.loads(listed)[0]["peer"] == PAYROLL
        status, _ = await admin_call(
            admin_port, "POST", "/guard/quarantines/release", json.dumps({"peer": PAYROLL}).encode()
        )
        assert status == 200
        status, listed = await admin_call(admin_port, "GET", "/guard/quarantines")
        assert json.loads(listed) == []
        assert (await env.request(_get("/ok/2")))[0] == 200
        nursery.cancel_scope.cancel()
    assert env.records()[0].get("dry_run") == [{"rule": "try-deny-ok", "outcome": "would_deny"}]
    text = metrics.render().decode()
    assert (
        'agent_proxy_dry_run_total{listener="hr-api",outcome="would_deny",rule="try-deny-ok"} 2.0'
    ) in text
    assert 'agent_proxy_quarantines_total{reason="deny_burst"} 1.0' in text
