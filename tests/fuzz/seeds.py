"""Valid inputs to mutate, minted once per process by the test PKI."""

from __future__ import annotations

import json
from functools import cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.pki import Issued, TestCA


@cache
def pki() -> tuple[TestCA, TestCA, Issued]:
    """A root, an intermediate under it, and a leaf SVID under the intermediate."""
    root = TestCA.create("a.org")
    intermediate = root.intermediate()
    return root, intermediate, intermediate.issue("spiffe://a.org/agent/payroll")


@cache
def certificates_pem() -> tuple[bytes, ...]:
    root, _, leaf = pki()
    return (leaf.cert_pem(), root.bundle_pem(), leaf.cert_pem() + root.bundle_pem())


@cache
def certificates_der() -> tuple[bytes, ...]:
    root, _, leaf = pki()
    return (leaf.cert_der(), root.bundle_der(), leaf.cert_der() + root.bundle_der())


@cache
def keys() -> tuple[bytes, ...]:
    _, _, leaf = pki()
    pkcs8, der = serialization.PrivateFormat.PKCS8, serialization.Encoding.DER
    none = serialization.NoEncryption()
    others = (
        rsa.generate_private_key(65537, 1024),
        ed25519.Ed25519PrivateKey.generate(),
        ec.generate_private_key(ec.SECP384R1()),
    )
    return (
        leaf.key_pem(),
        leaf.key.private_bytes(der, pkcs8, none),
        leaf.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, none
        ),
        *(k.private_bytes(serialization.Encoding.PEM, pkcs8, none) for k in others),
    )


@cache
def jwks() -> tuple[bytes, ...]:
    root, _, _ = pki()
    real = root.bundle_jwks()
    document = json.loads(real)
    document["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256"})
    return (real.encode(), json.dumps(document).encode())
