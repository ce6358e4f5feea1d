"""X509-SVIDs: the leaf and signing-certificate rules, and loading our own SVID.

Theory of operation: path validation (signatures, names, validity) is the
job of ``cryptography``'s verifier (see verify.py). What it does not know is
the SPIFFE profile on top of X.509, which lives here as two pure predicates:

* ``validate_leaf``: the X509-SVID leaf rules (sections 2, 3.1, 4, 5.2),
  which are what make a certificate an identity: exactly one URI SAN holding
  a SPIFFE ID with a path, not a CA, keyUsage with digitalSignature and
  without keyCertSign/cRLSign, and serverAuth+clientAuth when EKU is present.
* ``validate_signing_cert``: a CA in the chain has cA=true and keyCertSign
  (sections 3.2, 4.1, 4.3).

The same predicates run on our own SVID when it is loaded (so we never
present something peers will refuse) and on every peer (verify.py).

Loading accepts what SVID sources hand us: PEM files from spiffe-helper or
cert-manager, and concatenated DER from the Workload API. Concatenated DER
is split by reading each top-level ASN.1 SEQUENCE header; that is framing,
not X.509 parsing: every piece still goes through cryptography's parser.

Error messages never include key material: key parsing errors are replaced
by fixed messages (``from None``), since we cannot vouch for what a
library's message might echo.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.identity.spiffe_id import SpiffeId, SpiffeIdError

SvidPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
"""Key types we can present in TLS (pyOpenSSL) and that SPIRE issues."""

_SUPPORTED_KEY_TYPES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)

_PEM_MARKER = b"-----BEGIN"

# What cryptography's certificate loaders raise for bad input: ValueError,
# and InvalidVersion (not a ValueError) for a version field other than v1-v3.
_UNPARSABLE = (ValueError, x509.InvalidVersion)

_ExtT = TypeVar("_ExtT", bound=x509.ExtensionType)


class SvidError(ValueError):
    """A certificate or key breaks an X509-SVID rule, or cannot be parsed.

    ``reason`` is a stable label for audit records: "invalid_svid", or
    "certificate_expired" from :func:`check_validity`.
    """

    reason: str = "invalid_svid"

    def __init__(self, message: str, *, reason: str = "invalid_svid") -> None:
        super().__init__(message)
        self.reason = reason


def describe(cert: x509.Certificate) -> str:
    """A short, log-safe name for a certificate: its subject, or its serial."""
    try:
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = ""
    return repr(subject) if subject else f"serial {_serial_hex(cert)}"


def _serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _extension(cert: x509.Certificate, kind: type[_ExtT]) -> x509.Extension[_ExtT] | None:
    # cryptography parses extensions lazily; a malformed or duplicated one
    # surfaces here, and must be the certificate's fault, not a crash.
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise SvidError(f"certificate has a malformed extension: {exc}") from exc


# The SVID rules are a pure function of a certificate's bytes, and a peer
# presents the same SVID on every connection until it rotates: remember the
# answer (x509.Certificate hashes and compares by its DER). Failures raise
# and are never cached; the bound keeps hostile variety cheap.
@functools.lru_cache(maxsize=256)
def validate_leaf(cert: x509.Certificate) -> SpiffeId:
    """Check the X509-SVID leaf rules and return the leaf's SPIFFE ID."""
    san = _extension(cert, x509.SubjectAlternativeName)
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier) if san else []
    if len(uris) != 1:
        raise SvidError(
            f"an X509-SVID must have exactly one URI SAN, found {len(uris)} (X509-SVID 2)"
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(f"URI SAN is not a SPIFFE ID: {exc}") from exc
    if not spiffe_id.path:
        raise SvidError(
            f"leaf SPIFFE ID {spiffe_id} has no path; a leaf must have one (X509-SVID 3.1)"
        )

    constraints = _extension(cert, x509.BasicConstraints)
    # An absent basicConstraints extension means "not a CA" (RFC 5280 4.2.1.9).
    if constraints is not None and constraints.value.ca:
        raise SvidError(
            "leaf certificate is a CA: basicConstraints cA must be false (X509-SVID 4.1)"
        )

    # The standard also says keyUsage MUST be critical; that binds issuers,
    # and no SPIFFE validator (go-spiffe included) rejects on it, so neither do we.
    usage = _extension(cert, x509.KeyUsage)
    if usage is None:
        raise SvidError("keyUsage extension is missing (X509-SVID 4.3)")
    if not usage.value.digital_signature:
        raise SvidError("keyUsage must include digitalSignature (X509-SVID 4.3)")
    if usage.value.key_cert_sign:
        raise SvidError("keyUsage of a leaf must not include keyCertSign (X509-SVID 5.2)")
    if usage.value.crl_sign:
        raise SvidError("keyUsage of a leaf must not include cRLSign (X509-SVID 5.2)")

    extended = _extension(cert, x509.ExtendedKeyUsage)
    if extended is not None:
        missing = [
            name
            for oid, name in (
                (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
            )
            if oid not in extended.value
        ]
        if missing:
            raise SvidError(
                "extendedKeyUsage must include serverAuth and clientAuth; "
                f"missing {' and '.join(missing)} (X509-SVID 4.4)"
            )
    return spiffe_id


@functools.lru_cache(maxsize=256)
def validate_signing_cert(cert: x509.Certificate) -> None:
    """Check that ``cert`` may sign SVIDs: cA=true and keyCertSign."""
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.value.ca:
        raise SvidError(
            f"signing certificate {describe(cert)} is not a CA: "
            "basicConstraints cA must be true (X509-SVID 4.1)"
        )
    usage = _extension(cert, x509.KeyUsage)
    if usage is None or not usage.value.key_cert_sign:
        raise SvidError(
            f"signing certificate {describe(cert)}: keyUsage must include keyCertSign "
            "(X509-SVID 4.3)"
        )


def check_validity(cert: x509.Certificate, now: dt.datetime) -> None:
    """Raise SvidError(reason="certificate_expired") unless ``now`` is inside
    the certificate's validity period (both ends inclusive, RFC 5280 4.1.2.5)."""
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    if now < not_before:
        raise SvidError(
            f"certificate not valid before {_timestamp(not_before)}",
            reason="certificate_expired",
        )
    if now > not_after:
        raise SvidError(
            f"certificate expired at {_timestamp(not_after)}", reason="certificate_expired"
        )


def _timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- loading certificates ---------------------------------------------------


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """All CERTIFICATE blocks of a PEM document, in order."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except _UNPARSABLE as exc:
        raise SvidError(f"cannot parse PEM certificates: {exc}") from exc
    if not certs:
        raise SvidError("no certificates found in PEM data")
    return certs


def _split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER into top-level SEQUENCEs (X.690 8.1.2-8.1.3)."""
    pieces: list[bytes] = []
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30:  # SEQUENCE, constructed
            raise SvidError(f"not DER certificate data: expected a SEQUENCE at byte {offset}")
        if offset + 2 > len(data):
            raise SvidError(f"truncated DER certificate at byte {offset}")
        first = data[offset + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            # 0x80 is BER's indefinite length, which DER forbids; more than
            # 4 length bytes would mean a certificate over 4 GiB.
            if count == 0 or count > 4:
                raise SvidError(f"invalid DER length encoding at byte {offset}")
            header = 2 + count
            if offset + header > len(data):
                raise SvidError(f"truncated DER certificate at byte {offset}")
            length = int.from_bytes(data[offset + 2 : offset + header], "big")
        end = offset + header + length
        if end > len(data):
            raise SvidError(f"truncated DER certificate at byte {offset}")
        pieces.append(data[offset:end])
        offset = end
    return pieces


def load_der_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates from concatenated DER, as the Workload API sends them."""
    certs: list[x509.Certificate] = []
    for index, piece in enumerate(_split_der(data)):
        try:
            certs.append(x509.load_der_x509_certificate(piece))
        except _UNPARSABLE as exc:
            raise SvidError(f"certificate {index} is not a valid DER certificate: {exc}") from exc
    if not certs:
        raise SvidError("no certificates found in DER data")
    return certs


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates from PEM (any number of CERTIFICATE blocks) or concatenated DER."""
    if not data.strip():
        raise SvidError("no certificates found: the data is empty")
    if _PEM_MARKER in data:
        return load_pem_certificates(data)
    return load_der_certificates(data)


# --- loading keys -------------------------------------------------------------


def load_private_key(data: bytes) -> SvidPrivateKey:
    """An unencrypted private key from PEM or DER (PKCS#8, SEC1 or PKCS#1).

    Messages are fixed strings: nothing from the key data can reach a log.
    """
    if not data.strip():
        raise SvidError("no private key found: the data is empty")
    try:
        if _PEM_MARKER in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise SvidError("private key is encrypted; an unencrypted key is required") from None
    except (ValueError, UnsupportedAlgorithm, InternalError):
        # InternalError: OpenSSL refusing a key it parsed (an X448 key of
        # the wrong length, found by tests/fuzz/test_fuzz_svid.py).
        raise SvidError(
            "cannot parse private key: expected an unencrypted PKCS#8, SEC1 or PKCS#1 "
            "key in PEM or DER"
        ) from None
    if not isinstance(key, _SUPPORTED_KEY_TYPES):
        raise SvidError(
            f"unsupported private key type {type(key).__name__}: use ECDSA, RSA or Ed25519"
        )
    return key


def _public_key_der(key: SvidPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_public_key_der(cert: x509.Certificate) -> bytes:
    try:
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SvidError(f"certificate has an unsupported public key: {exc}") from exc


def _check_issued_by(child: x509.Certificate, issuer: x509.Certificate, index: int) -> None:
    # Peers will reject a chain in the wrong order; say so at load time, where
    # the operator can still fix the file, rather than in a peer's log.
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise SvidError(
            f"certificate {index} is not issued by certificate {index + 1}: "
            "the chain must be the leaf followed by its intermediates, in order"
        ) from None


@dataclass(frozen=True)
class X509Svid:
    """Our own SVID: the leaf, the intermediates to present with it, and its key."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    # repr=False: no private key in any log line, ever (invariant 1).
    private_key: SvidPrivateKey = field(repr=False, compare=False)

    # Cached (the certificate is immutable): every accepted connection asks
    # whether our SVID expired, and cryptography builds a new datetime per read.
    @functools.cached_property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @functools.cached_property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial_hex(self) -> str:
        return _serial_hex(self.leaf)

    @property
    def leaf_der(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.DER)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The leaf followed by its intermediates: what we present in TLS."""
        return (self.leaf, *self.intermediates)


def load_x509_svid(cert_data: bytes, key_data: bytes) -> X509Svid:
    """Load and check an SVID: leaf first, then intermediates; key must match the leaf.

    Validity times are not checked here; the caller decides what "now" is
    (see :func:`check_validity`).
    """
    certs = load_certificates(cert_data)
    leaf, intermediates = certs[0], certs[1:]
    spiffe_id = validate_leaf(leaf)
    for index, cert in enumerate(intermediates, start=1):
        try:
            validate_signing_cert(cert)
        except SvidError as exc:
            raise SvidError(f"intermediate {index}: {exc}") from exc
    for index in range(len(certs) - 1):
        _check_issued_by(certs[index], certs[index + 1], index)
    key = load_private_key(key_data)
    if _public_key_der(key) != _cert_public_key_der(leaf):
        raise SvidError("private key does not match the certificate")
    return X509Svid(
        spiffe_id=spiffe_id,
        leaf=leaf,
        intermediates=tuple(intermediates),
        private_key=key,
    )
