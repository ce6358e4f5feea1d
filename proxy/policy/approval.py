"""Step-up for high-impact actions: fresh attestation and approval tokens.

Theory of operation. A rule with ``high_impact`` asks for either or both of:

* a fresh attestation: the requesting peer's SVID was issued less than
  ``max_svid_age`` ago (the workload re-attested recently);
* an approval token from an approver: a compact JWS signed with the
  approver's own X509-SVID key, carrying that SVID's chain in the ``x5c``
  header. It is verified against the bundle of the *approver's* trust domain
  (the same scoped check as a TLS peer, :func:`~proxy.identity.verify_x509_svid`),
  and binds: who may use it (``sub``), what for (``htm`` the method, ``target``
  the path or tool, ``body_sha256`` the body or arguments), who approved
  (``iss`` = the x5c leaf's SPIFFE ID), and when (``iat``, ``exp`` at most
  5 minutes later). A :class:`ReplayCache` makes each token usable once.

Signatures are made and checked by PyJWT (``jwt.PyJWS``) with
``cryptography`` keys; we never hand-roll them. The algorithm comes from the
leaf's key type (ES256/ES384/ES512 for P-256/384/521, RS256 for RSA, EdDSA
for Ed25519), never from the token, so no algorithm confusion is possible.

Where a token travels: the HTTP header :data:`APPROVAL_HEADER`; for MCP
``tools/call`` also ``params._meta[`` :data:`APPROVAL_META_KEY` ``]``.
For HTTP the method is the HTTP method, the target the normalised path and
the hash the SHA-256 of the request body bytes. For MCP the method is
``tools/call``, the target the tool name and the hash the SHA-256 of
:func:`canonical_json` of the arguments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.identity import (
    ChainError,
    SpiffeId,
    SpiffeIdError,
    SvidError,
    TrustBundleSet,
    X509Svid,
    verify_x509_svid,
)
from proxy.policy.canonical import canonical_json
from proxy.policy.peers import SpiffePattern

__all__ = [
    "APPROVAL_HEADER",
    "APPROVAL_META_KEY",
    "MAX_TTL",
    "ApprovalError",
    "ApprovalResult",
    "ReplayCache",
    "body_sha256",
    "canonical_json",
    "check_high_impact",
    "mint_approval",
    "verify_approval",
]

APPROVAL_HEADER = "Agent-Approval"
APPROVAL_META_KEY = "agent-approval"
TOKEN_TYPE = "agent-approval+jws"  # noqa: S105 - a JOSE "typ", not a secret
MAX_TTL = 300  # seconds: exp - iat
CLOCK_SKEW = 30  # seconds an iat may be in the future
_MAX_TOKEN_BYTES = 16384

# Reasons (audit and metrics label values; the detail says what is needed).
OK = "approved"
MISSING = "approval_missing"
INVALID = "approval_invalid"
UNTRUSTED = "approval_untrusted"
WRONG_APPROVER = "approval_wrong_approver"
MISMATCH = "approval_mismatch"
EXPIRED = "approval_expired"
TOO_LONG = "approval_too_long"
REPLAYED = "approval_replayed"
REPLAY_CACHE_FULL = "approval_replay_cache_full"
ATTESTATION_STALE = "attestation_stale"
ATTESTATION_UNKNOWN = "attestation_unknown"


class ApprovalError(ValueError):
    """Minting refused: bad input (the message says what)."""


def body_sha256(data: bytes) -> str:
    """Lowercase hex SHA-256, as tokens carry it."""
    return hashlib.sha256(data).hexdigest()


def _alg_for_key(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        alg = curve.get(key.curve.name)
        if alg is None:
            raise ApprovalError(f"unsupported EC curve {key.curve.name} for approvals")
        return alg
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ApprovalError(f"unsupported key type {type(key).__name__} for approvals")


def _b64der(cert: x509.Certificate) -> str:
    # x5c is standard base64 of DER (RFC 7515 4.1.6), not base64url.
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")


def mint_approval(
    svid: X509Svid,
    requester: SpiffeId,
    method: str,
    target: str,
    body_hash: str,
    *,
    now: datetime,
    ttl: float = MAX_TTL,
) -> str:
    """A compact JWS approving ``requester`` to do ``method target`` with that body."""
    if not 0 < ttl <= MAX_TTL:
        raise ApprovalError(f"ttl must be more than 0 and at most {MAX_TTL}s, got {ttl:g}s")
    if not method or not target:
        raise ApprovalError("method and target must not be empty")
    if len(body_hash) != 64 or any(c not in "0123456789abcdef" for c in body_hash):
        raise ApprovalError("body_sha256 must be 64 lowercase hex digits")
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    iat = math.floor(now.timestamp())
    claims = {
        "iss": str(svid.spiffe_id),
        "sub": str(requester),
        "htm": method,
        "target": target,
        "body_sha256": body_hash,
        "iat": iat,
        "exp": iat + math.floor(ttl),
        "jti": uuid.uuid4().hex,
    }
    import jwt  # here: PyJWT costs start-up time and most sidecars never mint

    alg = _alg_for_key(svid.private_key)
    payload = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    return jwt.PyJWS().encode(
        payload,
        svid.private_key,
        algorithm=alg,
        headers={"typ": TOKEN_TYPE, "x5c": [_b64der(c) for c in svid.chain]},
    )


@dataclass(frozen=True, slots=True)
class ApprovalResult:
    ok: bool
    reason: str  # "approved" or one of the approval_*/attestation_* reasons
    detail: str = ""  # what is needed, for the refusal body and the audit record
    approver: SpiffeId | None = None
    jti: str | None = None


class ReplayCache:
    """Token ids seen, each kept until its token expires. Bounded: when full of
    unexpired ids, new tokens are refused (fail closed), never forgotten early."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._max = max_entries
        self._seen: dict[tuple[str, str], float] = {}
        self._no_sweep_before = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def add(self, key: tuple[str, str], exp: float, now: float) -> str | None:
        """Record ``key`` (issuer, jti); a refusal reason, or None when recorded."""
        found = self._seen.get(key)
        if found is not None and found >= now:
            return REPLAYED
        if len(self._seen) >= self._max and not self._sweep(now):
            return REPLAY_CACHE_FULL
        self._seen[key] = exp
        return None

    def _sweep(self, now: float) -> bool:
        if now < self._no_sweep_before:
            return False
        for key in [k for k, exp in self._seen.items() if exp < now]:
            del self._seen[key]
        if len(self._seen) < self._max:
            return True
        self._no_sweep_before = min(self._seen.values())
        return False


def _refuse(reason: str, detail: str, approver: SpiffeId | None = None) -> ApprovalResult:
    return ApprovalResult(False, reason, detail, approver)


def _claim_str(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"claim {name!r} must be a non-empty string")
    return value


def _claim_int(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"claim {name!r} must be an integer")
    return value


def verify_approval(
    token: str | None,
    *,
    bundles: TrustBundleSet,
    approvers: Sequence[SpiffePattern],
    requester: SpiffeId,
    method: str,
    target: str,
    body_hash: str,
    now: datetime,
    replay: ReplayCache,
) -> ApprovalResult:
    """Check an approval token for this exact request; consume it when it is good."""
    import jwt  # here: PyJWT costs start-up time and only guarded requests need it

    need = f"an approval token from {', '.join(p.text for p in approvers) or 'an approver'}"
    if not token:
        return _refuse(MISSING, f"this action needs {need} in the {APPROVAL_HEADER} header")
    if len(token) > _MAX_TOKEN_BYTES:
        return _refuse(INVALID, "the approval token is too large")
    # 1. The header: the approver's chain. Nothing in it is trusted yet.
    try:
        header = jwt.get_unverified_header(token)
        if header.get("typ") != TOKEN_TYPE:
            raise ValueError(f"typ must be {TOKEN_TYPE!r}")
        x5c = header.get("x5c")
        if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
            raise ValueError("x5c must be a non-empty list of base64 certificates")
        certs = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
    # InvalidVersion is not a ValueError: a certificate whose version field is
    # past v3 must be a refusal, not an exception out of the gate.
    except (jwt.PyJWTError, ValueError, binascii.Error, x509.InvalidVersion) as exc:
        return _refuse(INVALID, f"malformed approval token: {exc}")
    # 2. The chain, scoped to the approver's own trust domain.
    try:
        verified = verify_x509_svid(certs[0], certs[1:], bundles, now)
    except (ChainError, SvidError, ValueError) as exc:
        return _refuse(UNTRUSTED, f"the approver's certificate is not trusted: {exc}")
    approver = verified.spiffe_id
    # 3. The signature, with the algorithm the leaf's key dictates.
    try:
        key = certs[0].public_key()
        alg = _alg_for_key(key)
        payload = jwt.PyJWS().decode(token, key, algorithms=[alg])  # type: ignore[arg-type]
        claims = json.loads(payload)
        if not isinstance(claims, dict):
            raise ValueError("the payload is not a JSON object")
        iss = SpiffeId.parse(_claim_str(claims, "iss"))
        sub = _claim_str(claims, "sub")
        htm = _claim_str(claims, "htm")
        tgt = _claim_str(claims, "target")
        digest = _claim_str(claims, "body_sha256")
        iat, exp = _claim_int(claims, "iat"), _claim_int(claims, "exp")
        jti = _claim_str(claims, "jti")
    except (jwt.PyJWTError, ApprovalError, ValueError, SpiffeIdError) as exc:
        return _refuse(INVALID, f"invalid approval token: {exc}", approver)
    if iss != approver:
        return _refuse(
            INVALID, f"the token's iss {iss} is not the signer's SPIFFE ID {approver}", approver
        )
    # 4. Who approved.
    if not any(p.matches(approver) for p in approvers):
        return _refuse(
            WRONG_APPROVER, f"{approver} may not approve this action; it needs {need}", approver
        )
    if approver == requester:
        return _refuse(WRONG_APPROVER, "an identity cannot approve its own request", approver)
    # 5. When.
    t = now.timestamp()
    if exp - iat > MAX_TTL:
        return _refuse(
            TOO_LONG,
            f"the token is valid for {exp - iat}s; at most {MAX_TTL}s is allowed",
            approver,
        )
    if exp <= iat or iat > t + CLOCK_SKEW:
        return _refuse(INVALID, "the token's iat/exp are inconsistent or in the future", approver)
    if t >= exp:
        return _refuse(
            EXPIRED, f"the approval expired {math.ceil(t - exp)}s ago; get a new one", approver
        )
    # 6. What for.
    for name, got, want in (
        ("sub", sub, str(requester)),
        ("method", htm, method),
        ("target", tgt, target),
        ("body_sha256", digest, body_hash),
    ):
        if got != want:
            return _refuse(
                MISMATCH,
                f"the approval is for a different {name} ({got!r}, this request has {want!r})",
                approver,
            )
    # 7. Once.
    problem = replay.add((str(approver), jti), float(exp), t)
    if problem == REPLAYED:
        return _refuse(REPLAYED, "this approval token was already used; get a new one", approver)
    if problem is not None:
        return _refuse(problem, "too many live approvals; try again shortly", approver)
    return ApprovalResult(True, OK, "", approver, jti)


def check_high_impact(
    *,
    max_svid_age: float | None,
    approvers: Sequence[SpiffePattern],
    svid_age_seconds: float | None,
    token: str | None,
    bundles: TrustBundleSet,
    requester: SpiffeId,
    method: str,
    target: str,
    body_hash: str,
    now: datetime,
    replay: ReplayCache,
) -> ApprovalResult:
    """Everything a ``high_impact`` rule asks for: fresh attestation and/or approval."""
    if max_svid_age is not None:
        if svid_age_seconds is None:
            return _refuse(
                ATTESTATION_UNKNOWN, "this action needs a fresh SVID and its age is unknown"
            )
        if svid_age_seconds >= max_svid_age:
            return _refuse(
                ATTESTATION_STALE,
                f"this action needs an SVID issued less than {max_svid_age:g}s ago; "
                f"this one is {svid_age_seconds:.0f}s old (re-attest, then retry)",
            )
    if approvers:
        return verify_approval(
            token,
            bundles=bundles,
            approvers=approvers,
            requester=requester,
            method=method,
            target=target,
            body_hash=body_hash,
            now=now,
            replay=replay,
        )
    return ApprovalResult(True, OK)
