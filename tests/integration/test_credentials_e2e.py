"""Each credential type end to end: a real token endpoint (Authlib over TLS),
our provider, the header set by ``with_credential``, and a real upstream
that checks what arrived. The agent's own Authorization never gets there.

Every log line these tests produce is captured, and none may hold a token,
an assertion or a secret (nor may any error message or provider repr).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import h11
import pytest
import structlog
import trio
import trustme

from proxy.credentials import (
    CredentialProvider,
    CredentialUnavailable,
    with_credential,
)
from proxy.credentials.build import JwtSvidSource, build_provider
from proxy.credentials.config import CredentialConfig
from proxy.credentials.devjwt import DevJwtAuthority
from proxy.identity import TrustDomain, X509Svid, load_x509_svid
from proxy.identity.jwt_svid import JwtBundleSet, JwtSvidError, authenticate_bearer
from proxy.sources.proto import workload_pb2, workload_pb2_grpc
from proxy.tls.dns import build_dns_side, open_dns_stream
from tests.integration.oauth_support import (
    Client,
    JwtSvidAssertion,
    Served,
    TokenServer,
    X5cAssertion,
    bank_api,
    token_endpoint,
)
from tests.pki import TestCA

DEADLINE = 10
PAYROLL = "spiffe://a.org/agent/payroll"
AGENT_TOKEN = b"Bearer agent-held-token-must-not-leak"
SECRETS: list[str] = [AGENT_TOKEN.decode()]


@pytest.fixture(scope="module")
def idp_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def svid(ca_a: TestCA) -> X509Svid:
    issued = ca_a.issue(PAYROLL)
    return load_x509_svid(issued.cert_pem(), issued.key_pem())


@pytest.fixture
def ca_path(tmp_path: Path, idp_ca: trustme.CA) -> Path:
    path = tmp_path / "idp-ca.pem"
    idp_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured
    text = repr(captured)
    for secret in SECRETS:
        assert secret not in text, "a secret reached a log line"


def remember(*values: str) -> None:
    SECRETS.extend(v for v in values if v)


async def call_bank(
    bank: Served, idp_ca: trustme.CA, provider: CredentialProvider, n: int = 1
) -> None:
    """``n`` requests as the egress makes them: the agent's headers, with the
    route's credential set by with_credential."""
    from cryptography import x509

    trust = (x509.load_pem_x509_certificate(idp_ca.cert_pem.bytes()),)
    side = build_dns_side("bank.example", trust)
    for _ in range(n):
        cred = await provider.credential()
        agent_headers = [(b"host", b"bank.example"), (b"authorization", AGENT_TOKEN)]
        headers = with_credential(agent_headers, cred)
        stream = await open_dns_stream("127.0.0.1", bank.port, side, timeout=DEADLINE)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            req = h11.Request(method="GET", target="/balance", headers=headers)
            await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.EndOfMessage):
                    break


def authorizations(bank: Served) -> list[bytes]:
    return [v for req in bank.requests for n, v in req if n == b"authorization"]


@pytest.fixture
async def bank(idp_ca: trustme.CA) -> AsyncIterator[Served]:
    async with bank_api(idp_ca.issue_cert("bank.example")) as served:
        yield served


async def run_provider(nursery: trio.Nursery, provider: CredentialProvider) -> None:
    nursery.start_soon(provider.run)
    with trio.fail_after(DEADLINE):
        await provider.credential()


def check_clean(provider: CredentialProvider, server: TokenServer | None) -> None:
    if server is not None:
        remember(*server.issued)
    for token in SECRETS:
        assert token not in repr(provider)


async def test_oauth2_mtls(
    idp_ca: trustme.CA, ca_a: TestCA, svid: X509Svid, ca_path: Path, bank: Served
) -> None:
    server = TokenServer(expires_in=3600)
    server.clients["payroll-app"] = Client("payroll-app", "tls_client_auth", PAYROLL)
    async with token_endpoint(server, idp_ca.issue_cert("127.0.0.1"), client_ca=ca_a) as idp:
        cfg = CredentialConfig(
            type="oauth2-mtls",
            token_url=idp.url(),
            token_ca_file=ca_path,
            client_id="payroll-app",
            scope=("payments:read",),
        )
        provider = build_provider("bank", cfg, identity=lambda: svid)
        async with trio.open_nursery() as nursery:
            await run_provider(nursery, provider)
            await call_bank(bank, idp_ca, provider, n=5)
            nursery.cancel_scope.cancel()
    check_clean(provider, server)
    assert len(server.issued) == 1  # fetched once for many requests
    assert authorizations(bank) == [f"Bearer {server.issued[0]}".encode()] * 5
    assert AGENT_TOKEN not in authorizations(bank)


async def test_oauth2_mtls_wrong_svid_is_refused(
    idp_ca: trustme.CA, ca_a: TestCA, svid: X509Svid, ca_path: Path
) -> None:
    server = TokenServer(expires_in=3600)
    server.clients["payroll-app"] = Client("payroll-app", "tls_client_auth", "spiffe://a.org/x")
    async with token_endpoint(server, idp_ca.issue_cert("127.0.0.1"), client_ca=ca_a) as idp:
        cfg = CredentialConfig(
            type="oauth2-mtls", token_url=idp.url(), token_ca_file=ca_path, client_id="payroll-app"
        )
        provider = build_provider("bank", cfg, identity=lambda: svid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.run)
            with pytest.raises(CredentialUnavailable) as info:
                await provider.credential()
            nursery.cancel_scope.cancel()
    assert info.value.reason == "credential_unavailable"
    assert server.issued == [] and server.refused >= 1
    assert provider.failures >= 1


async def test_oauth2_jwt_bearer_svid_key(
    idp_ca: trustme.CA, ca_a: TestCA, svid: X509Svid, ca_path: Path, bank: Served
) -> None:
    server = TokenServer(expires_in=600)
    server.clients["payroll-app"] = Client("payroll-app", "private_key_jwt", PAYROLL)
    async with token_endpoint(server, idp_ca.issue_cert("127.0.0.1")) as idp:
        server.register_client_auth_method("private_key_jwt", X5cAssertion(idp.url(), ca_a))
        cfg = CredentialConfig(
            type="oauth2-jwt-bearer",
            token_url=idp.url(),
            token_ca_file=ca_path,
            client_id="payroll-app",
            assertion="svid-key",
        )
        provider = build_provider("bank", cfg, identity=lambda: svid)
        async with trio.open_nursery() as nursery:
            await run_provider(nursery, provider)
            await call_bank(bank, idp_ca, provider, n=3)
            nursery.cancel_scope.cancel()
    check_clean(provider, server)
    assert len(server.issued) == 1
    assert authorizations(bank) == [f"Bearer {server.issued[0]}".encode()] * 3


async def test_oauth2_jwt_bearer_jwt_svid(
    tmp_path: Path, idp_ca: trustme.CA, svid: X509Svid, ca_path: Path, bank: Served
) -> None:
    authority = DevJwtAuthority.load_or_create(tmp_path / "dev-ca", TrustDomain.parse("a.org"))
    server = TokenServer(expires_in=600)
    server.clients[PAYROLL] = Client(PAYROLL, "spiffe_jwt_svid", PAYROLL)
    async with token_endpoint(server, idp_ca.issue_cert("127.0.0.1")) as idp:
        jwks = authority.bundle_document()
        server.register_client_auth_method("spiffe_jwt_svid", JwtSvidAssertion(idp.url(), jwks))
        cfg = CredentialConfig(type="oauth2-jwt-bearer", token_url=idp.url(), token_ca_file=ca_path)
        provider = build_provider(
            "bank", cfg, identity=lambda: svid, jwt_source=JwtSvidSource(dev=authority)
        )
        async with trio.open_nursery() as nursery:
            await run_provider(nursery, provider)
            await call_bank(bank, idp_ca, provider, n=2)
            nursery.cancel_scope.cancel()
    check_clean(provider, server)
    assert authorizations(bank) == [f"Bearer {server.issued[0]}".encode()] * 2


async def test_jwt_svid_from_the_dev_ca(
    tmp_path: Path, idp_ca: trustme.CA, svid: X509Svid, bank: Served
) -> None:
    authority = DevJwtAuthority.load_or_create(tmp_path / "dev-ca", TrustDomain.parse("a.org"))
    assert (tmp_path / "dev-ca" / "jwt_key.pem").stat().st_mode & 0o777 == 0o600
    cfg = CredentialConfig(type="jwt-svid", audience="https://bank.example")
    provider = build_provider(
        "bank", cfg, identity=lambda: svid, jwt_source=JwtSvidSource(dev=authority)
    )
    async with trio.open_nursery() as nursery:
        await run_provider(nursery, provider)
        await call_bank(bank, idp_ca, provider, n=2)
        nursery.cancel_scope.cancel()
    # The upstream validates what it got as a JWT-SVID, with the published bundle.
    bundles = JwtBundleSet([authority.bundle])
    for request in bank.requests:
        got = authenticate_bearer(request, bundles, "https://bank.example", datetime.now(UTC))
        assert not isinstance(got, JwtSvidError), got
        assert str(got.spiffe_id) == PAYROLL
        remember(got.token)
    check_clean(provider, None)


class JwtAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    """FetchJWTSVID as SPIRE's agent answers it (security header required)."""

    def __init__(self, authority: DevJwtAuthority) -> None:
        self.authority = authority
        self.calls = 0

    def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: grpc.ServicerContext
    ) -> workload_pb2.JWTSVIDResponse:
        from proxy.identity import SpiffeId
        from proxy.identity.jwt_svid import mint_jwt_svid

        if dict(context.invocation_metadata()).get("workload.spiffe.io") != "true":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        self.calls += 1
        minted = mint_jwt_svid(
            self.authority.signing,
            SpiffeId.parse(PAYROLL),
            list(request.audience),
            now=datetime.now(UTC),
        )
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=PAYROLL, svid=minted.token)]
        )


async def test_jwt_svid_from_the_workload_api(
    tmp_path: Path, idp_ca: trustme.CA, svid: X509Svid, bank: Served
) -> None:
    authority = DevJwtAuthority.load_or_create(tmp_path / "spire", TrustDomain.parse("a.org"))
    agent = JwtAgent(authority)
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=2))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(agent, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        cfg = CredentialConfig(type="jwt-svid", audience="https://bank.example")
        source = JwtSvidSource(workload_api=f"ipv4:127.0.0.1:{port}")
        provider = build_provider("bank", cfg, identity=lambda: svid, jwt_source=source)
        async with trio.open_nursery() as nursery:
            await run_provider(nursery, provider)
            await call_bank(bank, idp_ca, provider, n=3)
            nursery.cancel_scope.cancel()
    finally:
        grpc_server.stop(grace=None).wait(DEADLINE)
    assert agent.calls == 1
    bundles = JwtBundleSet([authority.bundle])
    got = authenticate_bearer(bank.requests[0], bundles, "https://bank.example", datetime.now(UTC))
    assert not isinstance(got, JwtSvidError), got
    remember(got.token)
    assert AGENT_TOKEN not in authorizations(bank)


async def test_file_credential(
    tmp_path: Path, idp_ca: trustme.CA, svid: X509Svid, bank: Served
) -> None:
    secret_file = tmp_path / "bank-api-key"
    secret_file.write_text("legacy-api-key-123\n")
    secret_file.chmod(0o600)
    remember("legacy-api-key-123")
    cfg = CredentialConfig(type="file", path=secret_file, header="x-api-key", format="{secret}")
    provider = build_provider("bank", cfg, identity=lambda: svid)
    async with trio.open_nursery() as nursery:
        await run_provider(nursery, provider)
        await call_bank(bank, idp_ca, provider, n=2)
        nursery.cancel_scope.cancel()
    keys = [v for req in bank.requests for n, v in req if n == b"x-api-key"]
    assert keys == [b"legacy-api-key-123"] * 2
    # Not its header: the agent's Authorization is passed on untouched here.
    assert authorizations(bank) == [AGENT_TOKEN] * 2
    cred = await provider.credential()
    assert cred.static and cred.audit_fields()["credential_type"] == "file"
    check_clean(provider, None)


async def test_token_endpoint_down(
    svid: X509Svid, ca_path: Path, idp_ca: trustme.CA, logs: list[dict[str, Any]]
) -> None:
    server = TokenServer(expires_in=3600)
    server.clients["payroll-app"] = Client("payroll-app", "tls_client_auth", PAYROLL)
    server.down = True
    async with token_endpoint(server, idp_ca.issue_cert("127.0.0.1")) as idp:
        cfg = CredentialConfig(
            type="oauth2-mtls", token_url=idp.url(), token_ca_file=ca_path, client_id="payroll-app"
        )
        provider = build_provider("bank", cfg, identity=lambda: svid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.run)
            for _ in range(3):
                with pytest.raises(CredentialUnavailable) as info:
                    await provider.credential()
                assert info.value.reason == "credential_unavailable"
            nursery.cancel_scope.cancel()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings
    assert "HTTP 503 (temporarily_unavailable)" in warnings[0]["error"]
    assert provider.unavailable == 3


async def test_unreachable_token_endpoint(svid: X509Svid, ca_path: Path) -> None:
    cfg = CredentialConfig(
        type="oauth2-mtls",
        token_url="https://127.0.0.1:1/token",
        token_ca_file=ca_path,
        client_id="payroll-app",
        timeout=2,
    )
    provider = build_provider("bank", cfg, identity=lambda: svid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.run)
        with pytest.raises(CredentialUnavailable):
            await provider.credential()
        nursery.cancel_scope.cancel()
    assert provider.failures == 1 and provider.fetches == 0


def test_a_dev_jwt_key_openssl_refuses_is_a_clear_error(tmp_path: Path) -> None:
    from proxy.credentials.devjwt import DevJwtError
    from tests.unit.test_svid import X448_SHORT_KEY

    (tmp_path / "dev-ca").mkdir(mode=0o700)
    (tmp_path / "dev-ca" / "jwt_key.pem").write_bytes(X448_SHORT_KEY)  # InternalError inside
    with pytest.raises(DevJwtError, match="is not an unencrypted PEM private key"):
        DevJwtAuthority.load_or_create(tmp_path / "dev-ca", TrustDomain.parse("a.org"))
