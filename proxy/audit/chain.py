"""The hash chain and signed checkpoints of an audit trail (pure).

Theory of operation: every line of the trail is one JSON object ending in
``"seq":N,"prev":"H"}`` where ``seq`` counts records across the whole trail
(files, restarts) and ``prev`` is the SHA-256 (hex) of the previous line's
exact bytes, newline excluded. The first record of a trail has ``prev`` =
:data:`GENESIS`. Editing, deleting, inserting or reordering a line breaks the
link of the line after it; a checkpoint seals everything before it.

A checkpoint is a record (``event = "audit.checkpoint"``) carrying ``count``
(records before it) and ``head`` (its own ``prev``), plus ``jws``: a compact
JWS over ``{"seq", "count", "head", "sub", "iat"}`` signed with the sidecar's
SVID key at that moment, the SVID chain in the protected header's ``x5c``.
A verifier checks the chain against the bundle of the signer's own trust
domain *at the signing time* (``iat``), so checkpoints signed by an SVID that
has since rotated or expired still verify, while a key from another trust
domain never does.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.identity import ChainError, SvidPrivateKey, TrustBundleSet, verify_x509_svid

GENESIS = "0" * 64
CHECKPOINT = "audit.checkpoint"
GAP = "audit.gap"

# The sidecar's current SVID key and chain (leaf first): a callable, so the
# sink follows rotation.
Signer = Callable[[], tuple[SvidPrivateKey, Sequence[x509.Certificate]]]


def link(line: bytes) -> str:
    """The ``prev`` of the record after ``line`` (newline excluded)."""
    return hashlib.sha256(line).hexdigest()


def chained(body: str, seq: int, prev: str) -> bytes:
    """A rendered JSON object (``{...}``) with ``seq`` and ``prev`` appended."""
    return f'{body[:-1]},"seq":{seq},"prev":"{prev}"}}'.encode()


def _algorithm(key: SvidPrivateKey | Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {256: "ES256", 384: "ES384", 521: "ES512"}.get(key.curve.key_size, "ES256")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def sign_checkpoint(signer: Signer, *, seq: int, head: str, now: _dt.datetime) -> tuple[str, str]:
    """(the signer's SPIFFE ID, a compact JWS) sealing ``seq - 1`` records."""
    import jwt  # here: PyJWT costs start-up time; only signing and verifying need it

    key, chain = signer()
    from proxy.identity import validate_leaf

    subject = str(validate_leaf(chain[0]))
    payload = {
        "seq": seq,
        "count": seq - 1,
        "head": head,
        "sub": subject,
        "iat": int(now.timestamp()),
    }
    x5c = [
        base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode() for cert in chain
    ]
    token = jwt.encode(payload, key, algorithm=_algorithm(key), headers={"x5c": x5c})
    return subject, token


@dataclass(frozen=True)
class CheckpointProblem(Exception):
    """Why a checkpoint does not verify (one phrase, for ``audit verify``)."""

    message: str

    def __str__(self) -> str:
        return self.message


def verify_checkpoint(
    record: dict[str, Any], bundles: TrustBundleSet, signer_id: str | None
) -> str:
    """Check one checkpoint record; return its signer's SPIFFE ID or raise
    :class:`CheckpointProblem`. ``signer_id`` pins the trail's signer once the
    first checkpoint has named it."""
    import jwt  # here: PyJWT costs start-up time; only signing and verifying need it

    token = record.get("jws")
    if not isinstance(token, str) or not token:
        raise CheckpointProblem("missing signature")
    try:
        header = jwt.get_unverified_header(token)
        x5c = header.get("x5c")
        if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
            raise CheckpointProblem("bad signature: no x5c certificate chain")
        certs = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
        unverified = jwt.decode(token, options={"verify_signature": False})
    except CheckpointProblem:
        raise
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise CheckpointProblem(f"bad signature: malformed JWS ({exc})") from exc
    iat = unverified.get("iat")
    if not isinstance(iat, int):
        raise CheckpointProblem("bad signature: no iat")
    signed_at = _dt.datetime.fromtimestamp(iat, _dt.UTC)
    try:
        verified = verify_x509_svid(certs[0], certs[1:], bundles, signed_at)
    except ChainError as exc:
        raise CheckpointProblem(f"bad signature: signer not trusted ({exc})") from exc
    public = certs[0].public_key()
    try:
        payload = jwt.decode(
            token,
            public,  # type: ignore[arg-type]
            algorithms=[_algorithm(public)],
            options={"verify_exp": False, "verify_iat": False},
        )
    except (jwt.PyJWTError, ValueError) as exc:
        raise CheckpointProblem(f"bad signature: {exc}") from exc
    subject = str(verified.spiffe_id)
    if payload.get("sub") != subject:
        raise CheckpointProblem(f"bad signature: signed for {payload.get('sub')!r}, not {subject}")
    if record.get("local_id") != subject:
        raise CheckpointProblem(f"bad signature: signed by {subject}, not {record.get('local_id')}")
    if signer_id is not None and subject != signer_id:
        raise CheckpointProblem(f"bad signature: signer {subject} is not the trail's {signer_id}")
    for name in ("seq", "count", "head"):
        if payload.get(name) != record.get(name):
            raise CheckpointProblem(f"signed {name} does not match the record")
    if record.get("head") != record.get("prev"):
        raise CheckpointProblem("head does not match prev")
    return subject


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A record, or None when the line is not a JSON object with seq/prev."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    seq, prev = value.get("seq"), value.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str):
        return None
    return value
