"""The dev CA's JWT authority: a signing key and the SPIFFE JWT bundle.

Theory of operation: beside the dev CA (``<state_dir>/dev-ca/<td>/ca.pem``)
we keep ``jwt_key.pem`` (ECDSA P-256, 0600, created on first use) and
publish ``bundle.spiffe.json``: the trust domain's SPIFFE bundle with the CA
certificate as its ``x509-svid`` entry and the JWT key as its ``jwt-svid``
entry (Trust Domain and Bundle 4). Peers that validate our JWT-SVIDs read
that file; the key's ``kid`` is a hash of its public key, so it is stable
across restarts and changes when the key does.

Development only, like the dev CA itself: production JWT-SVIDs come from
SPIRE's Workload API (FetchJWTSVID).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InternalError, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from proxy.fileutil import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from proxy.identity import TrustDomain
from proxy.identity.jwt_svid import JwtBundle, JwtSigningKey

__all__ = ["BUNDLE_FILE", "JWT_KEY_FILE", "DevJwtAuthority", "DevJwtError"]

JWT_KEY_FILE = "jwt_key.pem"
BUNDLE_FILE = "bundle.spiffe.json"


class DevJwtError(Exception):
    """The dev JWT key cannot be created or read (one line, no key material)."""


def _kid(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:12]).decode().rstrip("=")


class DevJwtAuthority:
    """Signs dev JWT-SVIDs for one trust domain."""

    def __init__(self, trust_domain: TrustDomain, signing: JwtSigningKey) -> None:
        self.trust_domain = trust_domain
        self.signing = signing

    def __repr__(self) -> str:
        return f"DevJwtAuthority(trust_domain={self.trust_domain.name!r}, kid={self.signing.kid!r})"

    @property
    def bundle(self) -> JwtBundle:
        return JwtBundle.of(self.trust_domain, [self.signing])

    @classmethod
    def load_or_create(
        cls, ca_dir: Path, trust_domain: TrustDomain, ca_cert: x509.Certificate | None = None
    ) -> DevJwtAuthority:
        """Load ``jwt_key.pem`` from the dev CA's directory, creating it if
        missing, and (re)write the SPIFFE bundle beside it."""
        path = ca_dir / JWT_KEY_FILE
        try:
            ensure_private_dir(ca_dir)
            if path.exists():
                loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
                if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                    raise DevJwtError(f"{path} is not an ECDSA key")
                key = loaded
            else:
                key = ec.generate_private_key(ec.SECP256R1())
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                write_atomic(path, pem, PRIVATE_FILE_MODE)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError):
            # Say nothing about the content: it may be a key.
            raise DevJwtError(f"{path} is not an unencrypted PEM private key") from None
        except OSError as exc:
            raise DevJwtError(f"dev JWT key {path}: {exc.strerror or exc}") from None
        authority = cls(trust_domain, JwtSigningKey(_kid(key), key))
        authority.publish(ca_dir / BUNDLE_FILE, ca_cert)
        return authority

    def bundle_document(self, ca_cert: x509.Certificate | None = None) -> dict[str, object]:
        keys: list[dict[str, object]] = []
        if ca_cert is not None:
            der = ca_cert.public_bytes(serialization.Encoding.DER)
            public = ca_cert.public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise DevJwtError("the dev CA certificate does not hold an ECDSA key")
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
            keys.append({**jwk, "use": "x509-svid", "x5c": [base64.b64encode(der).decode()]})
        keys.append(self.signing.public_jwk())
        return {"keys": keys}

    def publish(self, path: Path, ca_cert: x509.Certificate | None = None) -> None:
        data = json.dumps(self.bundle_document(ca_cert), indent=2).encode() + b"\n"
        try:
            write_atomic(path, data, PUBLIC_FILE_MODE)
        except OSError as exc:
            raise DevJwtError(f"cannot write {path}: {exc.strerror or exc}") from None
