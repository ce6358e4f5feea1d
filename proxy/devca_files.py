"""The dev CA's files on disk: names, the SVID layout spiffe-helper uses, and
the checks that turn a certificate read back into a dev CA (or one clear
:class:`DevCAError`, whatever the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.errors import UsageError
from proxy.fileutil import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    write_atomic,
)
from proxy.identity import SpiffeId, TrustDomain

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca_key.pem"
SVID_CERT_FILE = "svid.pem"
SVID_KEY_FILE = "svid_key.pem"
BUNDLE_FILE = "bundle.pem"


class DevCAError(UsageError):
    """The dev CA cannot be created, loaded or used (one line, exit 2)."""


@dataclass(frozen=True, repr=False)
class IssuedSvid:
    """A freshly issued X509-SVID, in PEM, ready to be written out.

    ``cert_pem`` is the leaf followed by any intermediates (none for the dev
    CA, which signs leaves with its root); ``bundle_pem`` is the CA cert.
    """

    spiffe_id: SpiffeId
    cert_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    not_after: datetime
    serial_hex: str

    def __repr__(self) -> str:
        # Never the key, not even in a debug log.
        return (
            f"IssuedSvid(spiffe_id={str(self.spiffe_id)!r}, serial_hex={self.serial_hex!r}, "
            f"not_after={self.not_after.isoformat()!r})"
        )


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DevCAError(
            f"no dev CA in {path.parent}: {path.name} not found (run 'agent-proxy ca init')"
        ) from None
    except OSError as exc:
        raise DevCAError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def write_svid_files(out_dir: Path, issued: IssuedSvid) -> dict[str, Path]:
    """Write ``svid.pem``, ``svid_key.pem`` (0600) and ``bundle.pem`` (0644).

    Each file is replaced atomically. The bundle goes first and the
    certificate last, so a watcher keyed on ``svid.pem`` finds the matching
    key already in place; a watcher that catches a mismatched pair in
    between must (and does) keep its current SVID and retry.

    Returns ``{"svid": ..., "svid_key": ..., "bundle": ...}``.
    """
    out_dir = Path(out_dir)
    try:
        ensure_private_dir(out_dir)
    except FileExistsError:
        raise DevCAError(f"cannot create output directory {out_dir}: not a directory") from None
    except OSError as exc:
        raise DevCAError(
            f"cannot create output directory {out_dir}: {exc.strerror or exc}"
        ) from None
    paths = {
        "bundle": out_dir / BUNDLE_FILE,
        "svid_key": out_dir / SVID_KEY_FILE,
        "svid": out_dir / SVID_CERT_FILE,
    }
    contents = {
        "bundle": (issued.bundle_pem, PUBLIC_FILE_MODE),
        "svid_key": (issued.key_pem, PRIVATE_FILE_MODE),
        "svid": (issued.cert_pem, PUBLIC_FILE_MODE),
    }
    for name, path in paths.items():
        data, mode = contents[name]
        try:
            write_atomic(path, data, mode)
        except OSError as exc:
            raise DevCAError(f"cannot write {path}: {exc.strerror or exc}") from None
    return {"svid": paths["svid"], "svid_key": paths["svid_key"], "bundle": paths["bundle"]}


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# What cryptography raises for a certificate it parsed but cannot fully read
# (extensions and public keys are decoded lazily).
MALFORMED = (
    ValueError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def ec_public(cert: x509.Certificate, path: Path) -> ec.EllipticCurvePublicKey:
    try:
        public = cert.public_key()
    except MALFORMED as exc:
        raise DevCAError(f"{path} has an unreadable public key: {exc}") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise DevCAError(f"{path} does not hold an ECDSA certificate")
    return public


def trust_domain_of(cert: x509.Certificate, path: Path) -> TrustDomain:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise DevCAError(f"{path} has no spiffe://<trust domain> URI SAN") from None
    except MALFORMED as exc:
        raise DevCAError(f"{path} has a malformed extension: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise DevCAError(f"{path} must carry exactly one spiffe://<trust domain> URI SAN")
    text = uris[0]
    prefix = "spiffe://"
    if not text.startswith(prefix) or "/" in text[len(prefix) :]:
        raise DevCAError(f"{path} URI SAN {text!r} is not a trust domain ID")
    try:
        return TrustDomain.parse(text[len(prefix) :])
    except ValueError as exc:
        raise DevCAError(f"{path}: bad trust domain in URI SAN: {exc}") from None
