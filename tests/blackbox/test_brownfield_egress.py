"""Black-box: brownfield routes and credentials through ``agent-proxy run``.

One sidecar process for the module. Its egress has DNS-verified routes to
a trustme-certified "bank API" (one with the right name and an RFC 8705
``oauth2-mtls`` credential from a real Authlib token endpoint, one with a
wrong name, one whose token endpoint is down); its inbound listener takes
JWT-SVIDs from callers behind an L7 hop. The last test greps everything
the process wrote (audit, logs) and its ``/metrics`` for any secret.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.credentials.devjwt import BUNDLE_FILE, DevJwtAuthority
from proxy.identity import SpiffeId, TrustDomain
from proxy.identity.jwt_svid import mint_jwt_svid
from tests.integration.oauth_support import (
    Client,
    Served,
    TokenServer,
    bank_api,
    served_in_thread,
    token_endpoint,
)
from tests.pki import TestCA
from tests.support import DEADLINE, ProxyProcess

PAYROLL = "spiffe://a.org/agent/payroll"
L7_HOP = "spiffe://a.org/gateway/l7"  # named by no rule: it only carries callers
HR_AUDIENCE = "spiffe://a.org/svc/hr"
AGENT_TOKEN = "Bearer agent-held-token-must-not-leak"


class _Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        body = b'{"timesheets": []}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class World:
    proc: ProxyProcess
    egress: tuple[str, int]
    hr: tuple[str, int]
    admin: tuple[str, int]
    bank: Served
    idp: TokenServer
    jwt: DevJwtAuthority
    hop: ssl.SSLContext
    secrets: list[str] = field(default_factory=list)


def _metrics(admin: tuple[str, int]) -> str:
    conn = http.client.HTTPConnection(*admin, timeout=DEADLINE)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def _wait_metric(admin: tuple[str, int], line: str) -> None:
    """Wait (with a deadline) until /metrics shows ``line``."""
    end = time.monotonic() + DEADLINE
    while line not in _metrics(admin):
        if time.monotonic() > end:
            raise TimeoutError(f"{line!r} not in /metrics within {DEADLINE}s")
        threading.Event().wait(0.05)  # between scrapes, not to wait for the event


def _identity(tmp: Path, ca: TestCA) -> str:
    d = tmp / "id"
    ca.issue(PAYROLL).write(d, ca.bundle_pem())
    return (
        f'[identity]\nsource = "files"\ncert = "{d}/svid.pem"\nkey = "{d}/svid_key.pem"\n'
        f'bundle = "{d}/bundle.pem"\n[admin]\nlisten = "127.0.0.1:0"\n'
    )


def _config(tmp: Path, ca: TestCA, bank: Served, up: Served, down: Served, backend: int) -> str:
    route = (
        'target = "127.0.0.1:{port}"\nupstream_tls = "dns"\nserver_name = "{name}"\n'
        'ca_file = "idp-ca.pem"\nmethods = ["GET"]\npaths = ["/**"]\n'
    )
    credential = (
        '[outbound.routes.credential]\ntype = "oauth2-mtls"\ntoken_url = "{url}"\n'
        'token_ca_file = "idp-ca.pem"\nclient_id = "payroll-app"\nscope = ["payments:read"]\n'
    )
    return (
        _identity(tmp, ca)
        + f"""
[[inbound]]
name = "hr"
listen = "127.0.0.1:0"
target = "127.0.0.1:{backend}"
protocol = "http"
jwt_svid = {{ audience = "{HR_AUDIENCE}", bundles = {{ "a.org" = "jwt/{BUNDLE_FILE}" }} }}
[[inbound.rules]]
name = "payroll-by-jwt"
peers = ["{PAYROLL}"]
methods = ["GET"]
paths = ["/timesheets/**"]
when = 'peer.auth == "jwt-svid"'

[[outbound]]
name = "egress"
listen = "127.0.0.1:0"
protocol = "http-proxy"
[[outbound.routes]]
name = "bank"
host = "bank-api"
"""
        + route.format(port=bank.port, name="bank.example")
        + credential.format(url=up.url())
        + '[[outbound.routes]]\nname = "impostor"\nhost = "impostor-api"\n'
        + route.format(port=bank.port, name="other.example")
        + '[[outbound.routes]]\nname = "idp-down"\nhost = "down-api"\n'
        + route.format(port=bank.port, name="bank.example")
        + credential.format(url=down.url())
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca_a: TestCA) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("brownfield")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "idp-ca.pem"))
    jwt = DevJwtAuthority.load_or_create(tmp / "jwt", TrustDomain.parse("a.org"))
    idp, broken = TokenServer(expires_in=3600), TokenServer(expires_in=3600)
    idp.clients["payroll-app"] = Client("payroll-app", "tls_client_auth", PAYROLL)
    broken.down = True
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    servers = (
        partial(bank_api, ca.issue_cert("bank.example")),
        partial(token_endpoint, idp, ca.issue_cert("127.0.0.1"), client_ca=ca_a),
        partial(token_endpoint, broken, ca.issue_cert("127.0.0.1"), client_ca=ca_a),
    )
    with served_in_thread(*servers) as (bank, up, down):
        path = tmp / "sidecar.toml"
        path.write_text(_config(tmp, ca_a, bank, up, down, backend.server_address[1]))
        proc = ProxyProcess(["run", "--config", str(path)])
        hop = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        hop.check_hostname = False  # the sidecar's SVID names a SPIFFE ID, not a host
        hop.load_verify_locations(cadata=ca_a.bundle_pem().decode())
        hop_dir = tmp / "hop"
        ca_a.issue(L7_HOP).write(hop_dir, ca_a.bundle_pem())
        hop.load_cert_chain(hop_dir / "svid.pem", hop_dir / "svid_key.pem")
        try:
            w = World(
                proc,
                proc.wait_listener("egress"),
                proc.wait_listener("hr"),
                proc.wait_listener("admin"),
                bank,
                idp,
                jwt,
                hop,
                secrets=[AGENT_TOKEN],
            )
            # The first token is fetched in the background: wait for it.
            _wait_metric(
                w.admin, 'agent_proxy_credential_fetches_total{route="bank",type="oauth2-mtls"} 1.0'
            )
            yield w
        finally:
            proc.stop()
            backend.shutdown()
            backend.server_close()


def _egress_get(world: World, host: str, path: str = "/balance") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(*world.egress, timeout=DEADLINE)
    conn.request("GET", f"http://{host}{path}", headers={"authorization": AGENT_TOKEN})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, json.loads(body)


def _authorizations(bank: Served) -> list[bytes]:
    return [v for req in bank.requests for n, v in req if n == b"authorization"]


def test_dns_route_sets_the_oauth2_token_the_agent_never_held(world: World) -> None:
    for _ in range(3):
        status, body = _egress_get(world, "bank-api")
        assert (status, body) == (200, {"balance": 42})
    world.secrets.extend(world.idp.issued)
    assert len(world.idp.issued) == 1  # one token for many requests
    assert _authorizations(world.bank) == [f"Bearer {world.idp.issued[0]}".encode()] * 3
    assert "bank.example" in world.bank.sni  # SNI is the verified name
    record = world.proc.audit.wait_json(event="http.request", decision="allow", path="/balance")
    assert record["upstream_verification"] == "dns"
    assert record["upstream_dns_name"] == "bank.example"
    assert record["upstream_trust"] == "ca_file"
    assert record["credential_type"] == "oauth2-mtls"
    assert len(record["credential_digest"]) == 16


def test_wrong_server_name_is_refused_with_its_reason(world: World) -> None:
    before = len(world.bank.requests)
    status, body = _egress_get(world, "impostor-api")
    assert status == 502
    assert body["reason"] == "upstream_name_mismatch"
    record = world.proc.audit.wait_json(event="http.request", reason="upstream_name_mismatch")
    assert record["upstream_dns_name"] == "other.example"
    assert len(world.bank.requests) == before  # no request reached it


def test_token_endpoint_down_is_503_credential_unavailable(world: World) -> None:
    before = len(world.bank.requests)
    status, body = _egress_get(world, "down-api")
    assert status == 503
    assert body["reason"] == "credential_unavailable"
    assert "temporarily_unavailable" not in json.dumps(body)  # never the IdP's answer
    assert len(world.bank.requests) == before  # never sent without its credential
    world.proc.audit.wait_json(event="http.request", reason="credential_unavailable")
    _wait_metric(
        world.admin,
        'agent_proxy_credential_unavailable_total{route="idp-down",type="oauth2-mtls"} 1.0',
    )


def _hr_get(world: World, token: str | None) -> tuple[int, dict[str, Any], str | None]:
    raw = socket.create_connection(world.hr, timeout=DEADLINE)
    conn = http.client.HTTPConnection(*world.hr, timeout=DEADLINE)
    conn.sock = world.hop.wrap_socket(raw)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    conn.request("GET", "/timesheets/2026-11", headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, json.loads(body), response.getheader("www-authenticate")


def test_inbound_jwt_svid(world: World) -> None:
    now = datetime.now(UTC)
    good = mint_jwt_svid(world.jwt.signing, SpiffeId.parse(PAYROLL), [HR_AUDIENCE], now=now)
    wrong = mint_jwt_svid(world.jwt.signing, SpiffeId.parse(PAYROLL), ["spiffe://x/y"], now=now)
    world.secrets.extend([good.token, wrong.token])
    _Backend.seen.clear()
    status, body, _ = _hr_get(world, good.token)
    assert (status, body) == (200, {"timesheets": []})
    assert "authorization" not in _Backend.seen[0]  # the caller's proof stays with us
    record = world.proc.audit.wait_json(event="http.request", rule="payroll-by-jwt")
    assert record["peer_auth"] == "jwt-svid"
    assert record["jwt_peer_id"] == PAYROLL
    assert record["jwt_digest"] == good.digest
    status, body, challenge = _hr_get(world, wrong.token)
    assert (status, body["reason"]) == (401, "jwt_wrong_audience")
    assert challenge == 'Bearer error="invalid_token"'
    status, body, challenge = _hr_get(world, None)
    assert (status, body["reason"], challenge) == (401, "jwt_missing", "Bearer")
    assert len(_Backend.seen) == 1


def test_no_secret_in_audit_logs_or_metrics(world: World) -> None:
    metrics = _metrics(world.admin)
    assert 'agent_proxy_credential_fetch_failures_total{route="idp-down"' in metrics
    assert world.proc.stop() == 0
    written = "\n".join([*world.proc.audit.all_lines(), *world.proc.logs.all_lines(), metrics])
    assert "credential fetch failed" in written  # the incident is logged (once)
    assert written.count("credential fetch failed") == 1
    assert len(world.secrets) >= 4  # the agent's, the issued token, two JWT-SVIDs
    for secret in world.secrets:
        bare = secret.removeprefix("Bearer ")
        assert bare not in written, "a token or secret was written out"


def test_unreadable_ca_file_is_one_line_and_exit_2(tmp_path: Path, ca_a: TestCA) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        _identity(tmp_path, ca_a)
        + '[[outbound]]\nname = "egress"\nlisten = "127.0.0.1:0"\nprotocol = "http-proxy"\n'
        + '[[outbound.routes]]\nname = "bank"\nhost = "bank-api"\ntarget = "127.0.0.1:9"\n'
        + 'upstream_tls = "dns"\nserver_name = "bank.example"\nca_file = "missing.pem"\n'
        + 'methods = ["GET"]\npaths = ["/**"]\n'
    )
    proc = ProxyProcess(["run", "--config", str(path)])
    assert proc.proc.wait(timeout=DEADLINE) == 2
    line = proc.logs.wait_for(lambda text: "missing.pem" in text)
    assert "route bank: ca_file" in line
    assert not any("Traceback" in text for text in proc.logs.all_lines())
