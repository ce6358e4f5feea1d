"""A small SPIFFE test PKI built on ``cryptography``.

trustme cannot put a URI SAN in a certificate, so tests mint their own
X509-SVIDs here. Everything is ECDSA P-256 with SHA-256, the profile SPIRE
uses by default, so the certificates look like the ones the sidecar meets in
production.

Each certificate gets a fresh key. Sharing keys between certificates would
make tests lie: an "unrelated" CA holding the same key as the real one
would verify signatures it never made.

Typical use::

    ca = TestCA.create("a.org")
    svid = ca.issue("spiffe://a.org/agent/payroll")
    cert_path, key_path = svid.write(tmp_path, bundle=ca.bundle_pem())
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH

# Names accepted in ``key_usage=`` sets; they are KeyUsage's keyword names.
KEY_USAGE_NAMES = frozenset(
    {
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    }
)

_LEAF_LIFETIME = dt.timedelta(hours=1)
_CA_LIFETIME = dt.timedelta(days=30)
# Backdate a little so a certificate minted "now" is valid for a verifier
# whose clock reads a few seconds earlier.
_BACKDATE = dt.timedelta(minutes=1)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(names: Collection[str]) -> x509.KeyUsage:
    unknown = set(names) - KEY_USAGE_NAMES
    if unknown:
        raise ValueError(f"unknown key usage names: {sorted(unknown)}")
    flags = {name: name in names for name in KEY_USAGE_NAMES}
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Issued:
    """A certificate, its key and the intermediates above it (root excluded)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: list[x509.Certificate]

    def cert_pem(self) -> bytes:
        """Leaf followed by its intermediates: spiffe-helper's svid.pem layout."""
        return b"".join(_pem(c) for c in [self.cert, *self.chain])

    def cert_der(self) -> bytes:
        """Leaf followed by its intermediates as concatenated DER (Workload API)."""
        return b"".join(
            c.public_bytes(serialization.Encoding.DER) for c in [self.cert, *self.chain]
        )

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, bundle: bytes | None = None) -> tuple[Path, Path]:
        """Write svid.pem, svid_key.pem (0600) and, if given, bundle.pem."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / "svid.pem"
        key_path = directory / "svid_key.pem"
        cert_path.write_bytes(self.cert_pem())
        # Create the key file 0600 from the start rather than chmod after the
        # fact, so it is never world-readable even for an instant.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.key_pem())
        os.chmod(key_path, 0o600)  # O_CREAT's mode does not apply to an existing file
        if bundle is not None:
            (directory / "bundle.pem").write_bytes(bundle)
        return cert_path, key_path


@dataclass
class TestCA:
    """A signing certificate (root or intermediate) that can issue SVIDs."""

    __test__ = False  # not a pytest test class, despite the name

    trust_domain: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    parent: TestCA | None = field(default=None, repr=False)
    _children: int = field(default=0, repr=False)

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key_usage_cert_sign: bool = True,
        ca: bool = True,
    ) -> TestCA:
        """A self-signed root whose URI SAN is ``spiffe://<trust_domain>``."""
        key = new_key()
        name = _ca_name(trust_domain, "root")
        cert = _build(
            subject=name,
            issuer=name,
            public_key=key.public_key(),
            signing_key=key,
            uris=[f"spiffe://{trust_domain}"],
            ca=ca,
            key_usage=_ca_key_usage(key_usage_cert_sign),
            eku=None,
            not_before=not_before or now() - _BACKDATE,
            not_after=not_after or now() + _CA_LIFETIME,
        )
        return cls(trust_domain=trust_domain, cert=cert, key=key)

    @property
    def root(self) -> TestCA:
        return self if self.parent is None else self.parent.root

    @property
    def chain(self) -> list[x509.Certificate]:
        """This CA and its parents, excluding the root (a root's chain is [])."""
        if self.parent is None:
            return []
        return [self.cert, *self.parent.chain]

    def intermediate(
        self,
        *,
        ca: bool = True,
        key_usage_cert_sign: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        trust_domain: str | None = None,
    ) -> TestCA:
        """An intermediate signed by this CA (same trust domain unless given)."""
        self._children += 1
        td = trust_domain or self.trust_domain
        key = new_key()
        cert = _build(
            subject=_ca_name(td, f"intermediate {self._children}"),
            issuer=self.cert.subject,
            public_key=key.public_key(),
            signing_key=self.key,
            uris=[f"spiffe://{td}"],
            ca=ca,
            key_usage=_ca_key_usage(key_usage_cert_sign),
            eku=None,
            not_before=not_before or now() - _BACKDATE,
            not_after=not_after or now() + _CA_LIFETIME,
        )
        return TestCA(trust_domain=td, cert=cert, key=key, parent=self)

    def issue(
        self,
        spiffe_id: str | None,
        *,
        extra_uris: Sequence[str] = (),
        ca: bool = False,
        key_usage: str | Collection[str] | None = "default",
        eku: Sequence[ObjectIdentifier] | None = (SERVER_AUTH, CLIENT_AUTH),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        dns_names: Sequence[str] = (),
        key: ec.EllipticCurvePrivateKey | None = None,
        empty_subject: bool = False,
        eku_critical: bool = False,
    ) -> Issued:
        """Issue a leaf SVID. ``key_usage="default"`` means digitalSignature only;
        ``None`` leaves the extension out; ``eku=None`` leaves EKU out.
        ``empty_subject`` mimics issuers that rely on a critical URI SAN only;
        ``eku_critical`` marks EKU critical, which X509-SVID 4.4 allows."""
        if key_usage == "default":
            usage: x509.KeyUsage | None = _key_usage({"digital_signature"})
        elif key_usage is None:
            usage = None
        elif isinstance(key_usage, str):
            raise ValueError(f"key_usage must be 'default', a set of names or None: {key_usage!r}")
        else:
            usage = _key_usage(key_usage)
        leaf_key = key or new_key()
        uris = ([spiffe_id] if spiffe_id is not None else []) + list(extra_uris)
        subject = (
            x509.Name([])
            if empty_subject
            else x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agent-mtls-proxy tests"),
                    x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id or "no spiffe id"),
                ]
            )
        )
        cert = _build(
            subject=subject,
            issuer=self.cert.subject,
            public_key=leaf_key.public_key(),
            signing_key=self.key,
            uris=uris,
            dns_names=dns_names,
            ca=ca,
            key_usage=usage,
            eku=eku,
            eku_critical=eku_critical,
            not_before=not_before or now() - _BACKDATE,
            not_after=not_after or now() + _LEAF_LIFETIME,
        )
        return Issued(cert=cert, key=leaf_key, chain=self.chain)

    def bundle_pem(self) -> bytes:
        """The root certificate as PEM (for an intermediate: its root's)."""
        return _pem(self.root.cert)

    def bundle_der(self) -> bytes:
        return self.root.cert.public_bytes(serialization.Encoding.DER)

    def bundle_jwks(self) -> str:
        """A SPIFFE bundle (JWK Set) with one x509-svid entry for the root."""
        root = self.root
        numbers = root.key.public_key().public_numbers()
        entry = {
            "use": "x509-svid",
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
            # x5c is standard base64 (RFC 7517 4.7), not base64url.
            "x5c": [base64.b64encode(self.bundle_der()).decode("ascii")],
        }
        return json.dumps({"keys": [entry], "spiffe_sequence": 1, "spiffe_refresh_hint": 300})


def _ca_name(trust_domain: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agent-mtls-proxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} test {role}"),
        ]
    )


def _ca_key_usage(cert_sign: bool) -> x509.KeyUsage:
    names = {"key_cert_sign", "crl_sign"} if cert_sign else {"digital_signature"}
    return _key_usage(names)


def _build(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    uris: Sequence[str],
    ca: bool,
    key_usage: x509.KeyUsage | None,
    eku: Sequence[ObjectIdentifier] | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    dns_names: Sequence[str] = (),
    eku_critical: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    if names:
        # RFC 5280 4.2.1.6: with an empty subject the SAN must be critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=len(subject) == 0
        )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=eku_critical)
    return builder.sign(signing_key, hashes.SHA256())
