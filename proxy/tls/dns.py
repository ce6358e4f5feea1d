"""Client TLS to brownfield upstreams: ordinary HTTPS servers with a DNS name.

Theory of operation: a route with ``upstream_tls = "dns"`` talks to a server
that has a WebPKI-style certificate (a DNS name or IP in its subjectAltName),
not an SVID. OpenSSL builds and checks the chain against the route's trust
(a PEM ``ca_file`` or the system store): signatures, validity times, CA
flags. Its verdicts arrive in the verify callback with an ``errnum``, which
we turn into a distinct refusal reason (expired, unknown CA, ...). At depth
0, with the chain OpenSSL built in hand, the name is checked by
cryptography's X.509 verifier (``build_server_verifier`` with a ``DNSName``
or ``IPAddress``), the RFC 6125 matching a well-kept library does for us:
we never match names by hand. A failure returns False from the callback, so
the handshake ends with an alert and the reason stays on the connection's
:class:`DnsVerification` for the audit record.

Security choices: TLS 1.2 is the floor here (legacy servers), with
forward-secret AEAD suites only; OpenSSL negotiates 1.3 when the server has
it. SNI carries the name we verify (never for an IP, RFC 6066 section 3).
Session resumption is off so every connection runs the callback and its
verdict is fresh, as on the SPIFFE side. ``client_cert = "svid"`` presents
our current SVID; the side is rebuilt with every identity snapshot, like
the SPIFFE contexts.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import trio
from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from OpenSSL import SSL, crypto

from proxy.identity import SvidError, X509Svid, load_certificates
from proxy.tls.context import TlsSide
from proxy.tls.peercheck import Clock, utcnow
from proxy.tls.stream import TLSStream

__all__ = [
    "SYSTEM_TRUST",
    "DnsSide",
    "DnsTlsError",
    "DnsVerification",
    "TrustChoice",
    "build_dns_side",
    "check_server_name",
    "load_ca_file",
    "open_dns_stream",
    "verified_upstream",
]

SYSTEM_TRUST: Final = "system"
# What a DNS route trusts: the system store, or the CA certificates of its ca_file.
TrustChoice = Literal["system"] | Sequence[x509.Certificate]

# Reasons an upstream is refused; each names one thing an operator can fix.
NAME_MISMATCH = "upstream_name_mismatch"
EXPIRED = "upstream_certificate_expired"
NOT_YET_VALID = "upstream_certificate_not_yet_valid"
UNKNOWN_CA = "upstream_unknown_ca"
UNTRUSTED = "upstream_untrusted_chain"

# Forward secrecy and AEAD only, for servers that stop at TLS 1.2.
_TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305:"
    b"DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)

# OpenSSL X509_V_ERR codes -> (reason, text).
_X509_ERRORS: dict[int, tuple[str, str]] = {
    2: (UNKNOWN_CA, "unable to get issuer certificate"),
    7: (UNTRUSTED, "certificate signature failure"),
    9: (NOT_YET_VALID, "certificate is not yet valid"),
    10: (EXPIRED, "certificate has expired"),
    18: (UNKNOWN_CA, "self-signed certificate"),
    19: (UNKNOWN_CA, "self-signed certificate in chain"),
    20: (UNKNOWN_CA, "unable to get local issuer certificate"),
    21: (UNKNOWN_CA, "unable to verify the first certificate"),
    24: (UNTRUSTED, "invalid CA certificate"),
    26: (UNTRUSTED, "unsupported certificate purpose"),
}

# OpenSSL has judged the chain against the operator's trust; what we ask of
# cryptography is the name. Its strict WebPKI extension profiles would also
# refuse certificates that OpenSSL and browsers accept (a critical SAN on a
# leaf with a subject, private enterprise CAs), so they are relaxed to what
# the name check needs: a CA has basicConstraints, a leaf has a SAN.
_CA_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.BasicConstraints, Criticality.AGNOSTIC, None
)
_EE_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
)


class DnsTlsError(ValueError):
    """A DNS route's TLS settings cannot be used (bad ca_file, bad name)."""


def load_ca_file(path: Path) -> tuple[x509.Certificate, ...]:
    """The PEM certificates of a route's ``ca_file``; DnsTlsError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DnsTlsError(f"cannot read ca_file {path}: {exc.strerror or exc}") from None
    try:
        return tuple(load_certificates(data))
    except SvidError as exc:
        raise DnsTlsError(f"ca_file {path}: {exc}") from None


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def _subject(name: str) -> x509.DNSName | x509.IPAddress:
    """What the certificate must name: an IP address, or a DNS name in
    the A-label form certificates carry."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or not _HOSTNAME.match(name):
        raise DnsTlsError(
            f"server_name {name[:80]!r} is not a DNS name or IP address "
            "(lowercase letters, digits, '-' and '.'; IDNs in their xn-- form)"
        )
    return x509.DNSName(name)


def check_server_name(name: str) -> None:
    """DnsTlsError unless ``name`` can be verified (config checks it early)."""
    _subject(name)


@dataclass(frozen=True, slots=True)
class VerifiedUpstream:
    """What admitted the upstream, for the audit record."""

    server_name: str
    trust: str  # "system" or "ca_file"
    subject: str
    serial_hex: str
    not_after: _dt.datetime
    # The earliest not_after in the verified chain: a pooled connection to
    # this upstream must not be reused past it (continuous authentication).
    chain_not_after: _dt.datetime

    def audit_fields(self) -> dict[str, str]:
        return {
            "upstream_verification": "dns",
            "upstream_dns_name": self.server_name,
            "upstream_trust": self.trust,
            "upstream_serial": self.serial_hex,
            "upstream_not_after": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


class DnsVerification:
    """Per-connection state the verify callback fills in; ``reason`` and
    ``message`` have the meaning TLSStream expects of a peer verification."""

    __slots__ = ("_certs", "_side", "message", "reason", "verified")

    def __init__(self, side: DnsSide) -> None:
        self._side = side
        self._certs: dict[int, crypto.X509] = {}
        self.verified: VerifiedUpstream | None = None
        self.reason: str | None = None
        self.message: str | None = None

    def _fail(self, reason: str, message: str) -> bool:
        if self.reason is None:  # the first failure is the most specific one
            self.reason, self.message = reason, message
        return False

    def on_certificate(self, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            reason, text = _X509_ERRORS.get(errnum, (UNTRUSTED, f"X509 verify error {errnum}"))
            return self._fail(reason, f"{text} at depth {depth}")
        self._certs[depth] = cert
        if depth != 0:
            return True
        chain = [self._certs[d].to_cryptography() for d in sorted(self._certs)]
        self._certs.clear()
        try:
            self._side.check_name(chain)
        except VerificationError as exc:
            text = str(exc)
            # OpenSSL has already accepted the path, times and CA flags, so
            # what is left for cryptography to refuse is the name, or a leaf
            # its WebPKI profile forbids.
            if "no matching subjectAltName" in text:
                return self._fail(
                    NAME_MISMATCH,
                    f"certificate is not valid for {self._side.server_name!r}",
                )
            return self._fail(UNTRUSTED, f"certificate refused: {text[:200]}")
        except Exception as exc:  # never let a callback exception escape into OpenSSL
            return self._fail(UNTRUSTED, f"cannot check upstream certificate: {exc}")
        leaf = chain[0]
        self.verified = VerifiedUpstream(
            server_name=self._side.server_name,
            trust=self._side.trust,
            subject=leaf.subject.rfc4514_string(),
            serial_hex=format(leaf.serial_number, "x"),
            not_after=leaf.not_valid_after_utc,
            chain_not_after=min(c.not_valid_after_utc for c in chain),
        )
        return True


def _verify_callback(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    state = conn.get_app_data()
    if not isinstance(state, DnsVerification):
        return False
    return state.on_certificate(cert, errnum, depth, ok)


@dataclass(frozen=True)
class DnsSide:
    """A client SSL.Context for one DNS route, and the name it verifies."""

    context: SSL.Context
    server_name: str
    trust: str
    clock: Clock = utcnow

    def check_name(self, chain: Sequence[x509.Certificate]) -> None:
        """Raise VerificationError unless the leaf is valid for server_name.

        ``chain`` is the path OpenSSL verified, leaf first, anchor last."""
        builder = (
            PolicyBuilder()
            .store(Store([chain[-1]]))
            .time(self.clock())
            .extension_policies(
                ca_policy=_CA_POLICY,
                ee_policy=_EE_POLICY,
            )
        )
        verifier = builder.build_server_verifier(_subject(self.server_name))
        verifier.verify(chain[0], list(chain[1:-1]))

    def new_connection(self, sock: Any) -> tuple[SSL.Connection, DnsVerification]:
        """An SSL.Connection on ``sock``, as :meth:`TlsSide.new_connection`."""
        conn = SSL.Connection(self.context, sock)
        state = DnsVerification(self)
        conn.set_app_data(state)
        if not isinstance(_subject(self.server_name), x509.IPAddress):
            conn.set_tlsext_host_name(self.server_name.encode("ascii"))
        conn.set_connect_state()
        return conn, state


def build_dns_side(
    server_name: str,
    ca: TrustChoice,
    *,
    client_svid: X509Svid | None = None,
    clock: Clock = utcnow,
) -> DnsSide:
    """The client side for one route. ``ca`` is "system" or the route's CA
    certificates (see :func:`load_ca_file`); ``client_svid`` is presented
    when the route says ``client_cert = "svid"``."""
    _subject(server_name)  # refuse a bad name now, not at the first dial
    ctx = SSL.Context(SSL.TLS_METHOD)
    # Invariant 6 allows TLS 1.2 where configured; a DNS route is that
    # configuration (legacy servers). Never below.
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(_TLS12_CIPHERS)
    if isinstance(ca, str):
        if ca != SYSTEM_TRUST:
            raise DnsTlsError(f'ca must be "{SYSTEM_TRUST}" or certificates, got {ca!r}')
        ctx.set_default_verify_paths()
        trust: str = SYSTEM_TRUST
    else:
        if not ca:
            raise DnsTlsError("ca_file holds no certificate")
        store = ctx.get_cert_store()
        assert store is not None
        for cert in ca:
            store.add_cert(crypto.X509.from_cryptography(cert))
        # An operator who pins an intermediate (or the server's own
        # certificate) means that certificate, not the root above it: as
        # curl does, a trusted certificate anywhere in the chain anchors it.
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        trust = "ca_file"
    if client_svid is not None:
        ctx.use_certificate(client_svid.leaf)
        for cert in client_svid.intermediates:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(client_svid.private_key)
        ctx.check_privatekey()
    ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    ctx.set_verify_depth(8)
    return DnsSide(context=ctx, server_name=server_name, trust=trust, clock=clock)


def verified_upstream(stream: TLSStream) -> VerifiedUpstream | None:
    """What admitted the upstream of a stream from :func:`open_dns_stream`."""
    state: object = stream.peer
    return state.verified if isinstance(state, DnsVerification) else None


async def open_dns_stream(host: str, port: int, side: DnsSide, *, timeout: float) -> TLSStream:
    """Connect and handshake within ``timeout``; TLSHandshakeError (with a
    reason above) or OSError otherwise. The caller closes the stream."""
    with trio.fail_after(timeout):
        tcp = await trio.open_tcp_stream(host, port)
        # TLSStream only calls ``new_connection()`` and reads ``reason`` and
        # ``message`` off the verification it returns; DnsSide has both.
        # Integration point: TLSStream should take a protocol both sides meet.
        stream = TLSStream(tcp, cast(TlsSide, side))
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream
