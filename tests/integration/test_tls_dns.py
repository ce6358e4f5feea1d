"""DNS-verified upstream TLS (proxy/tls/dns.py) against real TLS servers.

The servers are Python's own ``ssl`` (a different TLS implementation's view
of the handshake) with certificates from trustme; each records the SNI it
saw and the client certificate it got.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509

from proxy.identity import load_x509_svid
from proxy.tls.dns import (
    DnsTlsError,
    build_dns_side,
    load_ca_file,
    open_dns_stream,
    verified_upstream,
)
from proxy.tls.stream import TLSHandshakeError
from tests.pki import TestCA

DEADLINE = 10
BANK = "bank.example"


@dataclass
class Seen:
    sni: list[str | None] = field(default_factory=list)
    client_certs: list[bytes | None] = field(default_factory=list)


@asynccontextmanager
async def tls_server(
    cert: trustme.LeafCert, *, client_ca: TestCA | None = None, max_tls: str = "1.3"
) -> AsyncIterator[tuple[int, Seen]]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if max_tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=client_ca.bundle_pem().decode())
    seen = Seen()

    def on_sni(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.sni.append(name)

    ctx.sni_callback = on_sni  # type: ignore[assignment]

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            await stream.do_handshake()
            seen.client_certs.append(stream.getpeercert(binary_form=True))
            await stream.send_all(b"hello " + stream.version().encode())
            await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], seen
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def bank_ca() -> trustme.CA:
    return trustme.CA()


def ca_certs(ca: trustme.CA) -> tuple[x509.Certificate, ...]:
    return (x509.load_pem_x509_certificate(ca.cert_pem.bytes()),)


async def dial(port: int, name: str, ca: trustme.CA, **kw: object) -> bytes:
    side = build_dns_side(name, ca_certs(ca), **kw)  # type: ignore[arg-type]
    stream = await open_dns_stream("127.0.0.1", port, side, timeout=DEADLINE)
    async with stream:
        verified = verified_upstream(stream)
        assert verified is not None
        fields = verified.audit_fields()
        assert fields["upstream_verification"] == "dns"
        assert fields["upstream_dns_name"] == name
        return await stream.receive_some()


async def refused(port: int, name: str, ca: trustme.CA) -> str:
    side = build_dns_side(name, ca_certs(ca))
    with pytest.raises(TLSHandshakeError) as info:
        await open_dns_stream("127.0.0.1", port, side, timeout=DEADLINE)
    return info.value.reason


async def test_right_name_passes_and_sni_is_the_name(bank_ca: trustme.CA) -> None:
    async with tls_server(bank_ca.issue_cert(BANK)) as (port, seen):
        assert await dial(port, BANK, bank_ca) == b"hello TLSv1.3"
    assert seen.sni == [BANK]
    assert seen.client_certs == [None]


async def test_tls12_server_is_accepted(bank_ca: trustme.CA) -> None:
    async with tls_server(bank_ca.issue_cert(BANK), max_tls="1.2") as (port, _):
        assert await dial(port, BANK, bank_ca) == b"hello TLSv1.2"


async def test_wrong_name_is_refused(bank_ca: trustme.CA) -> None:
    async with tls_server(bank_ca.issue_cert("other.example")) as (port, seen):
        assert await refused(port, BANK, bank_ca) == "upstream_name_mismatch"
    assert seen.sni == [BANK]


async def test_wildcard_matches_one_label_only(bank_ca: trustme.CA) -> None:
    async with tls_server(bank_ca.issue_cert("*.bank.example")) as (port, _):
        assert await dial(port, "api.bank.example", bank_ca)
        assert await refused(port, "a.b.bank.example", bank_ca) == "upstream_name_mismatch"


async def test_ip_server_name_checks_ip_san_and_sends_no_sni(bank_ca: trustme.CA) -> None:
    async with tls_server(bank_ca.issue_cert("127.0.0.1")) as (port, seen):
        assert await dial(port, "127.0.0.1", bank_ca)
        assert await refused(port, "127.0.0.2", bank_ca) == "upstream_name_mismatch"
    assert seen.sni == [None, None]


async def test_expired_certificate_is_refused(bank_ca: trustme.CA) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = bank_ca.issue_cert(BANK, not_before=past - dt.timedelta(days=30), not_after=past)
    async with tls_server(cert) as (port, _):
        assert await refused(port, BANK, bank_ca) == "upstream_certificate_expired"


async def test_unknown_ca_is_refused(bank_ca: trustme.CA) -> None:
    other = trustme.CA()
    async with tls_server(other.issue_cert(BANK)) as (port, _):
        assert await refused(port, BANK, bank_ca) == "upstream_unknown_ca"


async def test_system_trust_does_not_know_a_private_ca(bank_ca: trustme.CA) -> None:
    async with tls_server(bank_ca.issue_cert(BANK)) as (port, _):
        side = build_dns_side(BANK, "system")
        assert side.trust == "system"
        with pytest.raises(TLSHandshakeError) as info:
            await open_dns_stream("127.0.0.1", port, side, timeout=DEADLINE)
    assert info.value.reason == "upstream_unknown_ca"


async def test_client_cert_svid_is_presented(bank_ca: trustme.CA, ca_a: TestCA) -> None:
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    svid = load_x509_svid(issued.cert_pem(), issued.key_pem())
    async with tls_server(bank_ca.issue_cert(BANK), client_ca=ca_a) as (port, seen):
        assert await dial(port, BANK, bank_ca, client_svid=svid)
    der = seen.client_certs[0]
    assert der is not None
    assert x509.load_der_x509_certificate(der) == issued.cert


def test_ca_file_errors(tmp_path: Path, bank_ca: trustme.CA) -> None:
    good = tmp_path / "ca.pem"
    bank_ca.cert_pem.write_to_path(str(good))
    assert load_ca_file(good) == ca_certs(bank_ca)
    with pytest.raises(DnsTlsError, match="cannot read ca_file"):
        load_ca_file(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate")
    with pytest.raises(DnsTlsError, match="ca_file"):
        load_ca_file(junk)
    with pytest.raises(DnsTlsError, match="server_name"):
        build_dns_side("bad name!", ca_certs(bank_ca))


async def test_dns_side_builder_from_config(
    tmp_path: Path, bank_ca: trustme.CA, ca_a: TestCA
) -> None:
    from proxy.credentials.build import CredentialSetupError, dns_side_builder
    from proxy.credentials.config import UpstreamTlsConfig

    ca_file = tmp_path / "bank-ca.pem"
    bank_ca.cert_pem.write_to_path(str(ca_file))
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    svid = load_x509_svid(issued.cert_pem(), issued.key_pem())
    cert = bank_ca.issue_cert(BANK)
    async with tls_server(cert, client_ca=ca_a) as (port, seen):
        for client_cert, presented in (("none", False), ("svid", True)):
            cfg = UpstreamTlsConfig("dns", ca_file, BANK, client_cert)  # type: ignore[arg-type]
            side = dns_side_builder("bank", cfg)(svid)
            stream = await open_dns_stream("127.0.0.1", port, side, timeout=DEADLINE)
            async with stream:
                verified = verified_upstream(stream)
                assert verified is not None
                leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
                assert verified.chain_not_after == leaf.not_valid_after_utc
                await stream.receive_some()
            assert (seen.client_certs[-1] is not None) == presented
    with pytest.raises(CredentialSetupError, match="route bank: ca_file: cannot read"):
        dns_side_builder("bank", UpstreamTlsConfig("dns", tmp_path / "nope.pem", BANK))


async def test_a_pinned_self_signed_server_certificate(tmp_path: Path) -> None:
    # Legacy servers often have a self-signed certificate; ca_file pins it.
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy.example")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("legacy.example")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            await stream.do_handshake()
            await stream.send_all(b"legacy")
            await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        side = build_dns_side("legacy.example", [cert])
        stream = await open_dns_stream("127.0.0.1", port, side, timeout=DEADLINE)
        async with stream:
            assert await stream.receive_some() == b"legacy"
        wrong = build_dns_side("other.example", [cert])
        with pytest.raises(TLSHandshakeError) as info:
            await open_dns_stream("127.0.0.1", port, wrong, timeout=DEADLINE)
        assert info.value.reason == "upstream_name_mismatch"
        nursery.cancel_scope.cancel()


async def test_a_pinned_intermediate_anchors_the_chain() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    async with tls_server(intermediate.issue_cert(BANK)) as (port, _):
        # ca_file holds only the intermediate, as enterprise PKIs often hand out.
        assert await dial(port, BANK, intermediate)
        assert await dial(port, BANK, root)
        assert await refused(port, BANK, trustme.CA()) == "upstream_unknown_ca"


async def test_system_trust_reads_the_openssl_environment(
    tmp_path: Path, bank_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ca_file = "system" is OpenSSL's default store, which SSL_CERT_FILE moves:
    # proof that the system store is really loaded, not an empty one.
    ca_file = tmp_path / "system-bundle.pem"
    bank_ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    async with tls_server(bank_ca.issue_cert(BANK)) as (port, _):
        side = build_dns_side(BANK, "system")
        stream = await open_dns_stream("127.0.0.1", port, side, timeout=DEADLINE)
        async with stream:
            verified = verified_upstream(stream)
            assert verified is not None and verified.trust == "system"
