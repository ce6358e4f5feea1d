"""Trust bundles: the X.509 authorities of one trust domain, and the set of them.

A bundle always carries the name of the trust domain it is authoritative
for, recorded independently of its contents (SPIFFE Trust Domain and Bundle,
section 3): a CA certificate does not say which trust domain it serves, the
operator or the Workload API does. verify.py relies on this pairing to
check a peer only against its own trust domain's authorities.

Formats: PEM (files on disk), concatenated DER (the Workload API) and the
SPIFFE bundle format, a JWK Set (federation endpoints, ``spire-server
bundle show -format spiffe``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.identity.spiffe_id import TrustDomain
from proxy.identity.svid import SvidError, load_der_certificates, load_pem_certificates

# JWK "kty" values that can describe a certificate's public key (RFC 7518,
# RFC 8037). Entries with any other key type MUST be ignored (Bundle 4.2.1).
_KNOWN_KEY_TYPES = frozenset({"EC", "RSA", "OKP"})
_X509_SVID_USE = "x509-svid"


class BundleError(ValueError):
    """A trust bundle cannot be read, parsed, or is empty."""


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _authorities_from_jwks(data: bytes | str) -> list[x509.Certificate]:
    """The X509-SVID authorities of a SPIFFE bundle (X509-SVID 6.2)."""
    try:
        document = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BundleError(f"SPIFFE bundle is not valid JSON: {exc}") from exc
    except RecursionError:
        # json's decoder recurses once per nesting level: '[' * 5000 is enough.
        raise BundleError("SPIFFE bundle is nested too deeply") from None
    except TypeError:
        raise BundleError("SPIFFE bundle must be bytes or text") from None
    if not isinstance(document, dict):
        raise BundleError("SPIFFE bundle must be a JSON object")
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise BundleError('SPIFFE bundle must have a "keys" array (Bundle 4.1.3)')
    authorities: list[x509.Certificate] = []
    for index, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise BundleError(f"SPIFFE bundle keys[{index}] is not a JSON object")
        # jwt-svid entries and unknown uses or key types are ignored, as the
        # standard requires (Bundle 4.2.1, 4.2.2).
        # Hostile JSON puts any type anywhere: compare, never hash, an unknown value.
        kty = jwk.get("kty")
        if jwk.get("use") != _X509_SVID_USE or not isinstance(kty, str):
            continue
        if kty not in _KNOWN_KEY_TYPES:
            continue
        x5c = jwk.get("x5c")
        if not x5c:
            continue  # absent or empty x5c: the entry MUST be ignored (X509-SVID 6.2)
        if not isinstance(x5c, list) or not isinstance(x5c[0], str):
            raise BundleError(f"SPIFFE bundle keys[{index}].x5c must be an array of strings")
        # Only the first value counts; the rest MUST be ignored (X509-SVID 6.2).
        # x5c is standard base64, not base64url (RFC 7517 4.7).
        try:
            der = base64.b64decode(x5c[0], validate=True)
        except ValueError as exc:  # binascii.Error, and non-ASCII text
            raise BundleError(f"SPIFFE bundle keys[{index}].x5c[0] is not base64: {exc}") from exc
        try:
            authorities.append(x509.load_der_x509_certificate(der))
        except (ValueError, x509.InvalidVersion) as exc:
            raise BundleError(
                f"SPIFFE bundle keys[{index}].x5c[0] is not a DER certificate: {exc}"
            ) from exc
    return authorities


@dataclass(frozen=True)
class TrustBundle:
    """The X.509 authorities (CA certificates) of one trust domain. Never empty."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so the bundle stays immutable.
        object.__setattr__(self, "authorities", tuple(self.authorities))
        if not self.authorities:
            raise BundleError(f"trust bundle for {self.trust_domain} has no certificates")

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        try:
            certs = load_pem_certificates(data)
        except SvidError as exc:
            raise BundleError(f"trust bundle for {trust_domain}: {exc}") from exc
        return cls(trust_domain, tuple(certs))

    @classmethod
    def from_der(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """From concatenated DER certificates, as the Workload API sends them."""
        try:
            certs = load_der_certificates(data)
        except SvidError as exc:
            raise BundleError(f"trust bundle for {trust_domain}: {exc}") from exc
        return cls(trust_domain, tuple(certs))

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain, data: bytes | str) -> TrustBundle:
        """From a SPIFFE bundle (JWK Set); only its x509-svid entries are used."""
        try:
            certs = _authorities_from_jwks(data)
        except BundleError as exc:
            raise BundleError(f"trust bundle for {trust_domain}: {exc}") from exc
        if not certs:
            raise BundleError(
                f"trust bundle for {trust_domain} has no x509-svid authorities "
                "(X509-SVID 6.2: the trust domain does not support X509-SVIDs)"
            )
        return cls(trust_domain, tuple(certs))

    @classmethod
    def from_bytes(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """Detect the format: a JSON object is a SPIFFE bundle, "-----BEGIN" is
        PEM, anything else is taken as concatenated DER."""
        if not data.strip():
            raise BundleError(f"trust bundle for {trust_domain} is empty")
        if data.lstrip().startswith(b"{"):
            return cls.from_jwks(trust_domain, data)
        if b"-----BEGIN" in data:
            return cls.from_pem(trust_domain, data)
        return cls.from_der(trust_domain, data)

    @classmethod
    def load(cls, trust_domain: TrustDomain, path: str | os.PathLike[str]) -> TrustBundle:
        """Read a bundle file in any format :meth:`from_bytes` detects."""
        shown = os.fspath(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read trust bundle {shown}: {exc.strerror or exc}") from exc
        try:
            return cls.from_bytes(trust_domain, data)
        except BundleError as exc:
            raise BundleError(f"{shown}: {exc}") from exc

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.authorities)


class TrustBundleSet:
    """An immutable map from trust domain to its bundle; at most one bundle each."""

    __slots__ = ("_bundles",)

    def __init__(self, bundles: Iterable[TrustBundle] = ()) -> None:
        by_domain: dict[TrustDomain, TrustBundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in by_domain:
                # Merging silently would let one source widen another's trust.
                raise BundleError(f"more than one trust bundle for {bundle.trust_domain}")
            by_domain[bundle.trust_domain] = bundle
        self._bundles = by_domain

    def get(self, trust_domain: TrustDomain) -> TrustBundle | None:
        return self._bundles.get(trust_domain)

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self._bundles

    def __len__(self) -> int:
        return len(self._bundles)

    def __iter__(self) -> Iterator[TrustBundle]:
        return iter(tuple(self._bundles.values()))

    def __repr__(self) -> str:
        parts = ", ".join(f"{td}: {len(b.authorities)}" for td, b in self._bundles.items())
        return f"TrustBundleSet({parts})"

    @property
    def trust_domains(self) -> frozenset[TrustDomain]:
        return frozenset(self._bundles)

    def all_authorities(self) -> tuple[x509.Certificate, ...]:
        """Every authority of every trust domain, each once (e.g. for the
        acceptable-CA list a TLS server sends). Never use this for path
        validation: that must use the peer's own trust domain's bundle only."""
        seen: set[bytes] = set()
        out: list[x509.Certificate] = []
        for bundle in self._bundles.values():
            for cert in bundle.authorities:
                der = _der(cert)
                if der not in seen:
                    seen.add(der)
                    out.append(cert)
        return tuple(out)

    def with_bundle(self, bundle: TrustBundle) -> TrustBundleSet:
        """A new set with ``bundle`` added, replacing any for the same trust domain."""
        replaced = {**self._bundles, bundle.trust_domain: bundle}
        return TrustBundleSet(replaced.values())

    def fingerprint(self) -> str:
        """A SHA-256 over trust domain names and authorities, independent of
        order, to tell whether a new set differs from the current one."""
        digest = hashlib.sha256()
        for name in sorted(td.name for td in self._bundles):
            encoded = name.encode("ascii")
            digest.update(len(encoded).to_bytes(4, "big") + encoded)
            ders = sorted(_der(c) for c in self._bundles[TrustDomain(name)].authorities)
            digest.update(len(ders).to_bytes(4, "big"))
            for der in ders:
                # Length prefixes keep distinct inputs from hashing alike.
                digest.update(len(der).to_bytes(4, "big") + der)
        return digest.hexdigest()
