"""JWT-SVIDs: minting, the SPIFFE JWT bundle, and validation (pure).

Theory of operation: a JWT-SVID (SPIFFE JWT-SVID standard) is a JWS whose
``sub`` is a SPIFFE ID, signed by a key of that ID's trust domain. So
validation reads the unverified header and claims only to *find the key*:
the ``alg`` must be on the standard's allow-list (section 3: RS/ES/PS with
SHA-256/384/512; never ``none`` or HMAC), ``sub`` names the trust domain
whose JWT bundle we must hold, and the header's ``kid`` picks the key in
that bundle. Only then does PyJWT check the signature, with exactly that
key and that one algorithm. The claims are checked last against ``now``
passed in (``exp`` required and not past, ``aud`` containing ours), so the
function is pure and testable at any instant. Each refusal has a reason of
its own for the audit record; the token itself never appears in an error
(invariant 1 in spirit: a bearer token is a key).

The JWT bundle is the SPIFFE bundle format's ``use: "jwt-svid"`` entries
(Trust Domain and Bundle 4.2.2): JWKs with a ``kid``, one set per trust
domain, in a :class:`JwtBundleSet` so a key of a.org can never vouch for an
ID of b.org.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.identity.bundle import BundleError
from proxy.identity.spiffe_id import SpiffeId, SpiffeIdError, TrustDomain

__all__ = [
    "ALLOWED_ALGS",
    "JwtBundle",
    "JwtBundleSet",
    "JwtSigningKey",
    "JwtSvid",
    "JwtSvidError",
    "authenticate_bearer",
    "jws_alg_for",
    "mint_jwt_svid",
    "validate_jwt_svid",
]

ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
JWT_SVID_USE = "jwt-svid"
JwtPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
JwtPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Reasons, as audit records name them.
MALFORMED = "jwt_malformed"
BAD_ALG = "jwt_bad_alg"
BAD_SUBJECT = "jwt_bad_subject"
UNKNOWN_TRUST_DOMAIN = "jwt_unknown_trust_domain"
UNKNOWN_KEY = "jwt_unknown_key"
BAD_SIGNATURE = "jwt_bad_signature"
EXPIRED = "jwt_expired"
WRONG_AUDIENCE = "jwt_wrong_audience"
MISSING = "jwt_missing"

_SIGNATURE_ONLY: Any = {
    "verify_exp": False,
    "verify_aud": False,
    "verify_iat": False,
    "verify_nbf": False,
}
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class JwtSvidError(ValueError):
    """A JWT-SVID is refused; ``reason`` is one of the constants above."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def token_digest(token: str) -> str:
    """A short hash that tells tokens apart in audit records without
    revealing them (16 hex digits of SHA-256)."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """A JWT-SVID and what it says. ``token`` is never in a repr."""

    token: str = field(repr=False)
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: datetime

    @property
    def digest(self) -> str:
        return token_digest(self.token)


@dataclass(frozen=True)
class JwtSigningKey:
    """A private key that signs JWT-SVIDs, and its ``kid``."""

    kid: str
    private_key: JwtPrivateKey = field(repr=False)

    @property
    def alg(self) -> str:
        return jws_alg_for(self.private_key.public_key())

    def public_jwk(self) -> dict[str, Any]:
        """The bundle entry for this key (Trust Domain and Bundle 4.2.2)."""
        public = self.private_key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "use": JWT_SVID_USE, "kid": self.kid}


def jws_alg_for(public: object) -> str:
    """The JWS alg a key signs with: ES256/384/512 by curve, RS256 for RSA."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS.get(public.curve.name)
        if alg is None:
            raise ValueError(f"unsupported EC curve {public.curve.name} for a JWT-SVID")
        return alg
    if isinstance(public, rsa.RSAPublicKey):
        return "RS256"
    raise ValueError(f"{type(public).__name__} cannot sign a JWT-SVID (SPIFFE allows RS/ES/PS)")


@dataclass(frozen=True)
class JwtBundle:
    """The JWT authorities (public keys by ``kid``) of one trust domain."""

    trust_domain: TrustDomain
    keys: Mapping[str, JwtPublicKey]

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain, data: bytes | str) -> JwtBundle:
        """The ``jwt-svid`` entries of a SPIFFE bundle; BundleError otherwise."""
        where = f"JWT bundle for {trust_domain}"
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise BundleError(f"{where} is not valid JSON: {type(exc).__name__}") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise BundleError(f'{where} must be a JSON object with a "keys" array')
        found: dict[str, JwtPublicKey] = {}
        for index, jwk in enumerate(keys):
            if not isinstance(jwk, dict) or jwk.get("use") != JWT_SVID_USE:
                continue  # x509-svid and unknown uses are not ours (Bundle 4.2.1)
            if jwk.get("kty") not in ("EC", "RSA"):
                continue  # key types no allowed alg can use MUST be ignored
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                raise BundleError(f"{where}: keys[{index}] has no kid (Bundle 4.2.2)")
            if kid in found:
                raise BundleError(f"{where}: kid {kid[:64]!r} appears twice")
            try:
                key = jwt.PyJWK(jwk).key
            except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
                raise BundleError(f"{where}: keys[{index}] is not a usable JWK: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise BundleError(f"{where}: keys[{index}] is not a public key")
            found[kid] = key
        if not found:
            raise BundleError(f"{where} has no jwt-svid keys")
        return cls(trust_domain, found)

    @classmethod
    def of(cls, trust_domain: TrustDomain, signing: Iterable[JwtSigningKey]) -> JwtBundle:
        return cls(trust_domain, {k.kid: k.private_key.public_key() for k in signing})


class JwtBundleSet:
    """JWT bundles by trust domain; at most one each."""

    __slots__ = ("_bundles",)

    def __init__(self, bundles: Iterable[JwtBundle] = ()) -> None:
        by_domain: dict[TrustDomain, JwtBundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in by_domain:
                raise BundleError(f"more than one JWT bundle for {bundle.trust_domain}")
            by_domain[bundle.trust_domain] = bundle
        self._bundles = by_domain

    def get(self, trust_domain: TrustDomain) -> JwtBundle | None:
        return self._bundles.get(trust_domain)

    def __iter__(self) -> Iterator[JwtBundle]:
        return iter(tuple(self._bundles.values()))

    def __len__(self) -> int:
        return len(self._bundles)

    def __repr__(self) -> str:
        parts = ", ".join(f"{td}: {len(b.keys)}" for td, b in self._bundles.items())
        return f"JwtBundleSet({parts})"


def mint_jwt_svid(
    signing: JwtSigningKey,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    *,
    now: datetime,
    ttl: timedelta = timedelta(minutes=5),
) -> JwtSvid:
    """Sign a JWT-SVID for ``spiffe_id`` (the dev CA's job; SPIRE's otherwise)."""
    if not audience:
        raise ValueError("a JWT-SVID needs at least one audience")
    if ttl <= timedelta(0):
        raise ValueError("JWT-SVID ttl must be positive")
    issued = int(now.timestamp())
    expiry = issued + int(ttl.total_seconds())
    claims = {
        "sub": str(spiffe_id),
        "aud": list(audience),
        "exp": expiry,
        "iat": issued,
    }
    token = jwt.encode(
        claims,
        signing.private_key,
        algorithm=signing.alg,
        headers={"kid": signing.kid, "typ": "JWT"},
    )
    return JwtSvid(token, spiffe_id, tuple(audience), datetime.fromtimestamp(expiry, UTC))


def _numeric_date(claims: Mapping[str, Any], name: str) -> datetime | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtSvidError(f"JWT-SVID {name} is not a NumericDate", reason=MALFORMED)
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise JwtSvidError(f"JWT-SVID {name} is out of range", reason=MALFORMED) from None


def validate_jwt_svid(token: str, bundles: JwtBundleSet, audience: str, now: datetime) -> JwtSvid:
    """Validate ``token`` as a JWT-SVID for ``audience``; JwtSvidError otherwise."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:
        raise JwtSvidError(
            f"not a JWS compact token ({type(exc).__name__})", reason=MALFORMED
        ) from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        shown = alg[:20] if isinstance(alg, str) else type(alg).__name__
        raise JwtSvidError(f"JWT-SVID alg {shown!r} is not allowed", reason=BAD_ALG)
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtSvidError("JWT-SVID typ must be JWT or JOSE", reason=MALFORMED)
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise JwtSvidError("JWT-SVID has no sub", reason=BAD_SUBJECT)
    try:
        spiffe_id = SpiffeId.parse(sub)
    except SpiffeIdError as exc:
        raise JwtSvidError(f"JWT-SVID sub is not a SPIFFE ID: {exc}", reason=BAD_SUBJECT) from None
    td = spiffe_id.trust_domain
    bundle = bundles.get(td)
    if bundle is None:
        raise JwtSvidError(
            f"JWT-SVID for {spiffe_id}: no JWT bundle for trust domain {td}",
            reason=UNKNOWN_TRUST_DOMAIN,
        )
    kid = header.get("kid")
    key = bundle.keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise JwtSvidError(
            f"JWT-SVID for {spiffe_id}: kid not in the JWT bundle of {td}", reason=UNKNOWN_KEY
        )
    try:
        # Exactly the one allowed alg the header names, with the key of the
        # subject's own trust domain; the claims are checked below, at ``now``.
        jwt.decode(
            token,
            key,
            algorithms=[alg],
            options=_SIGNATURE_ONLY,
        )
    except (jwt.PyJWTError, ValueError, TypeError):
        raise JwtSvidError(
            f"JWT-SVID for {spiffe_id}: signature does not verify with the key of {td}",
            reason=BAD_SIGNATURE,
        ) from None
    expiry = _numeric_date(claims, "exp")
    if expiry is None:
        raise JwtSvidError(f"JWT-SVID for {spiffe_id} has no exp", reason=MALFORMED)
    if expiry <= now:
        raise JwtSvidError(f"JWT-SVID for {spiffe_id} expired", reason=EXPIRED)
    aud = claims.get("aud")
    auds = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
    if not auds or not all(isinstance(a, str) for a in auds):
        raise JwtSvidError(f"JWT-SVID for {spiffe_id} has no aud", reason=MALFORMED)
    if audience not in auds:
        raise JwtSvidError(
            f"JWT-SVID for {spiffe_id} is not for audience {audience!r}", reason=WRONG_AUDIENCE
        )
    return JwtSvid(token, spiffe_id, auds, expiry)


def authenticate_bearer(
    headers: Sequence[tuple[bytes, bytes]],
    bundles: JwtBundleSet,
    audience: str,
    now: datetime,
) -> JwtSvid | JwtSvidError:
    """The caller a request's ``Authorization: Bearer <JWT-SVID>`` proves,
    or why not. Header names are lowercase (as h11 and llhttp give them)."""
    values = [v for n, v in headers if n == b"authorization"]
    if not values:
        return JwtSvidError("no Authorization header", reason=MISSING)
    if len(values) > 1:
        return JwtSvidError("more than one Authorization header", reason=MALFORMED)
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return JwtSvidError("Authorization is not a Bearer token", reason=MISSING)
    try:
        text = token.strip().decode("ascii")
    except UnicodeDecodeError:
        return JwtSvidError("bearer token is not ASCII", reason=MALFORMED)
    try:
        return validate_jwt_svid(text, bundles, audience, now)
    except JwtSvidError as exc:
        return exc
