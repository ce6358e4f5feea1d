"""Parsers of outside input raise only their documented error, whatever the
bytes: JWT-SVIDs, JWT bundles, token endpoint responses, FetchJWTBundles."""

from __future__ import annotations

import base64
import contextlib
import json
import random
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec

from proxy.credentials.jwt_bundles import bundles_from_response
from proxy.credentials.provider import CredentialFetchError
from proxy.credentials.token_endpoint import parse_token_response
from proxy.identity import BundleError, SpiffeId, TrustDomain
from proxy.identity.jwt_svid import (
    JwtBundle,
    JwtBundleSet,
    JwtSigningKey,
    JwtSvidError,
    mint_jwt_svid,
    validate_jwt_svid,
)
from proxy.sources.proto import workload_pb2

NOW = datetime(2026, 12, 1, tzinfo=UTC)
A = TrustDomain.parse("a.org")
KEY = JwtSigningKey("k", ec.generate_private_key(ec.SECP256R1()))
BUNDLES = JwtBundleSet([JwtBundle.of(A, [KEY])])
GOOD = mint_jwt_svid(KEY, SpiffeId.parse("spiffe://a.org/x"), ["aud"], now=NOW).token
DEEP = "[" * 100000 + "]" * 100000


def b64(obj: object) -> str:
    raw = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mutations(rng: random.Random, text: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = chr(rng.randrange(32, 127))
        out.append("".join(chars))
    return out


def test_jwt_svid_inputs() -> None:
    rng = random.Random(14)
    head, body, sig = GOOD.split(".")
    odd_values: list[object] = [None, 1, 1e308, float("nan"), [], ["ES256"], {"a": 1}, "x" * 5000]
    tokens = mutations(rng, GOOD, 300)
    tokens += [f"{b64({'alg': v, 'kid': 'k'})}.{body}.{sig}" for v in odd_values]
    tokens += [f"{b64({'alg': 'ES256', 'kid': v})}.{body}.{sig}" for v in odd_values]
    tokens += [
        f"{head}.{b64({'sub': 'spiffe://a.org/x', 'aud': 'aud', 'exp': v})}.{sig}"
        for v in odd_values
    ]
    tokens += [f"{head}.{b64({'sub': v, 'aud': v, 'exp': 1})}.{sig}" for v in odd_values]
    tokens += [f"{b64(DEEP)}.{body}.{sig}", f"{head}.{b64(DEEP)}.{sig}", "..", "a.b", "\x00"]
    for token in tokens:
        with contextlib.suppress(JwtSvidError):
            validate_jwt_svid(token, BUNDLES, "aud", NOW + timedelta(seconds=1))


def test_jwt_bundle_inputs() -> None:
    rng = random.Random(15)
    doc = json.dumps({"keys": [KEY.public_jwk()]})
    docs = [*mutations(rng, doc, 300), DEEP, "", "null", '{"keys": {}}', '{"keys": [1, null]}']
    docs += [
        json.dumps({"keys": [{**KEY.public_jwk(), field: v}]})
        for field in ("kty", "crv", "x", "y", "kid")
        for v in (None, 1, [], "")
    ]
    for data in docs:
        with contextlib.suppress(BundleError):
            JwtBundle.from_jwks(A, data)
    for key in ("", "spiffe://", "a.org/x", "A.ORG", "spiffe://a.org"):
        with contextlib.suppress(BundleError):
            bundles_from_response(workload_pb2.JWTBundlesResponse(bundles={key: doc.encode()}))


def test_token_response_inputs() -> None:
    rng = random.Random(16)
    doc = json.dumps({"access_token": "t", "token_type": "Bearer", "expires_in": 60})
    bodies = [m.encode() for m in mutations(rng, doc, 300)]
    bodies += [DEEP.encode(), b"\xff\xfe", b"", json.dumps({"error": "x" * 10000}).encode()]
    bodies += [
        json.dumps({"access_token": "t", "token_type": "Bearer", "expires_in": v}).encode()
        for v in (1e308, float("inf"), "1e9", [], None, "-1")
    ]
    for status in (200, 400, 503):
        for body in bodies:
            with contextlib.suppress(CredentialFetchError):
                parse_token_response("https://idp/token", status, body, NOW)
