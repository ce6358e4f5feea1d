"""The embedded development CA: one self-signed ECDSA P-256 root per trust domain.

Theory of operation: ``DevCA.init`` creates a root key and a self-signed
certificate carrying the trust domain's SPIFFE ID (``spiffe://<td>``) as its
URI SAN, and writes them as ``ca.pem`` and ``ca_key.pem`` in a directory.
``DevCA.load`` reads them back and checks that they belong together.
``DevCA.issue`` mints a short-lived X509-SVID leaf for an ID in the CA's
trust domain; ``write_svid_files`` lays it out the way spiffe-helper does
(``svid.pem``, ``svid_key.pem``, ``bundle.pem``) so the file source can watch
it.

This is for development and tests: the root key sits on disk (0600). In
production SVIDs come from SPIRE through the Workload API.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InternalError, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.devca_files import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    MALFORMED,
    DevCAError,
    IssuedSvid,
    ec_public,
    read_file,
    rfc3339,
    trust_domain_of,
    write_svid_files,
)
from proxy.fileutil import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    write_atomic,
)
from proxy.identity import SpiffeId, TrustDomain

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DevCA",
    "DevCAError",
    "IssuedSvid",
    "write_svid_files",
]


DEFAULT_CA_TTL = timedelta(days=365)
DEFAULT_SVID_TTL = timedelta(hours=1)
# Backdate not_before so a peer whose clock is a little behind ours does not
# reject a freshly issued certificate as not yet valid.
CLOCK_SKEW = timedelta(seconds=30)

_CA_ORG = "agent-mtls-proxy dev CA"
_LEAF_ORG = "agent-mtls-proxy"


def _td_id(trust_domain: TrustDomain) -> str:
    return trust_domain.id_string()


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def _random_serial() -> int:
    # 128 random bits (RFC 5280 allows up to 20 octets; CAB forum asks for
    # at least 64 bits of entropy). Zero is not a valid serial.
    serial = 0
    while serial == 0:
        serial = secrets.randbits(128)
    return serial


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


class DevCA:
    """A loaded dev CA: its certificate, key and trust domain."""

    __slots__ = ("_cert", "_key", "directory", "trust_domain")

    def __init__(
        self,
        directory: Path,
        trust_domain: TrustDomain,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self._cert = cert
        self._key = key

    def __repr__(self) -> str:
        return (
            f"DevCA(directory={str(self.directory)!r}, "
            f"trust_domain={self.trust_domain.name!r}, not_after={self.not_after.isoformat()!r})"
        )

    # -- properties -------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def not_before(self) -> datetime:
        return self._cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self._cert.not_valid_after_utc

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY_FILE

    # -- creation and loading ----------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        trust_domain: TrustDomain,
        *,
        ttl: timedelta = DEFAULT_CA_TTL,
        force: bool = False,
        now: datetime | None = None,
    ) -> DevCA:
        """Create a new root in ``directory`` (made 0700 if missing).

        Refuses to replace an existing CA unless ``force``.
        """
        if ttl <= timedelta(0):
            raise DevCAError("CA ttl must be positive")
        directory = Path(directory)
        cert_path = directory / CA_CERT_FILE
        key_path = directory / CA_KEY_FILE
        if not force:
            for existing in (cert_path, key_path):
                if existing.exists() or existing.is_symlink():
                    raise DevCAError(
                        f"a dev CA already exists in {directory} ({existing.name}); "
                        "use --force to replace it"
                    )
        try:
            ensure_private_dir(directory)
        except FileExistsError:
            raise DevCAError(f"cannot create CA directory {directory}: not a directory") from None
        except OSError as exc:
            raise DevCAError(
                f"cannot create CA directory {directory}: {exc.strerror or exc}"
            ) from None

        issued_at = _now(now)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _CA_ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, trust_domain.name[:64]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(issued_at - CLOCK_SKEW)
            .not_valid_after(issued_at + ttl)
            # The dev CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            # X509-SVID §3: a signing certificate should carry the SPIFFE ID
            # of its trust domain.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(_td_id(trust_domain))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        # Key first: a crash between the two writes leaves a key without a
        # certificate (load reports it), never a certificate whose key is lost.
        for path, data, mode in (
            (key_path, key_pem, PRIVATE_FILE_MODE),
            (cert_path, cert_pem, PUBLIC_FILE_MODE),
        ):
            try:
                write_atomic(path, data, mode)
            except OSError as exc:
                raise DevCAError(f"cannot write {path}: {exc.strerror or exc}") from None
        return cls(directory, trust_domain, cert, key)

    @classmethod
    def load(cls, directory: Path) -> DevCA:
        """Read ``ca.pem`` and ``ca_key.pem`` from ``directory``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DevCAError(
                f"no dev CA in {directory}: not a directory (run 'agent-proxy ca init')"
            )
        cert_path = directory / CA_CERT_FILE
        key_path = directory / CA_KEY_FILE
        cert_data = read_file(cert_path, "CA certificate")
        key_data = read_file(key_path, "CA key")
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
        except (ValueError, x509.InvalidVersion):
            raise DevCAError(f"{cert_path} is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError):
            # Say nothing about the content: it may be a key.
            raise DevCAError(f"{key_path} is not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise DevCAError(f"{key_path} is not an ECDSA key")
        if key.public_key().public_numbers() != ec_public(cert, cert_path).public_numbers():
            raise DevCAError(f"{key_path} does not match the certificate in {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        except MALFORMED as exc:
            raise DevCAError(f"{cert_path} has a malformed extension: {exc}") from None
        if bc is None or not bc.ca:
            raise DevCAError(f"{cert_path} is not a CA certificate")
        return cls(directory, trust_domain_of(cert, cert_path), cert, key)

    # -- issuing -------------------------------------------------------------

    def issue(
        self,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta = DEFAULT_SVID_TTL,
        now: datetime | None = None,
    ) -> IssuedSvid:
        """Mint an X509-SVID for ``spiffe_id`` valid for ``ttl`` from ``now``.

        ``not_after`` never goes beyond the CA's own ``not_after``.
        """
        if ttl <= timedelta(0):
            raise DevCAError("SVID ttl must be positive")
        if spiffe_id.trust_domain.name != self.trust_domain.name:
            raise DevCAError(
                f"{spiffe_id} is not in the CA's trust domain {self.trust_domain.name}"
            )
        if not spiffe_id.path or spiffe_id.path == "/":
            raise DevCAError(
                f"{spiffe_id} has no path: an X509-SVID leaf must identify a workload, "
                "not a trust domain"
            )
        issued_at = _now(now)
        if issued_at >= self.not_after:
            raise DevCAError(f"the dev CA expired at {rfc3339(self.not_after)}")
        if issued_at < self.not_before:
            raise DevCAError(f"the dev CA is not valid before {rfc3339(self.not_before)}")
        not_before = max(issued_at - CLOCK_SKEW, self.not_before)
        not_after = min(issued_at + ttl, self.not_after)

        key = ec.generate_private_key(ec.SECP256R1())
        serial = _random_serial()
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _LEAF_ORG),
                        x509.NameAttribute(
                            NameOID.ORGANIZATIONAL_UNIT_NAME, self.trust_domain.name[:64]
                        ),
                    ]
                )
            )
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            # X509-SVID §2: exactly one URI SAN, the SPIFFE ID.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return IssuedSvid(
            spiffe_id=spiffe_id,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key_pem,
            bundle_pem=self.cert_pem,
            not_after=cert.not_valid_after_utc,
            serial_hex=_serial_hex(serial),
        )
