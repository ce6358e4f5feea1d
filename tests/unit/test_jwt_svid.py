"""JWT-SVID minting, JWT bundles and validation (proxy/identity/jwt_svid.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.identity import BundleError, SpiffeId, TrustDomain
from proxy.identity.jwt_svid import (
    JwtBundle,
    JwtBundleSet,
    JwtSigningKey,
    JwtSvidError,
    authenticate_bearer,
    mint_jwt_svid,
    validate_jwt_svid,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
A = TrustDomain.parse("a.org")
B = TrustDomain.parse("b.org")
PAYROLL = SpiffeId.parse("spiffe://a.org/agent/payroll")
AUD = "spiffe://a.org/svc/hr"

KEY_A = JwtSigningKey("a-1", ec.generate_private_key(ec.SECP256R1()))
KEY_B = JwtSigningKey("b-1", ec.generate_private_key(ec.SECP384R1()))
KEY_RSA = JwtSigningKey("a-rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))
BUNDLES = JwtBundleSet([JwtBundle.of(A, [KEY_A, KEY_RSA]), JwtBundle.of(B, [KEY_B])])


def claims(**override: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sub": str(PAYROLL),
        "aud": [AUD],
        "exp": int((NOW + timedelta(minutes=5)).timestamp()),
        "iat": int(NOW.timestamp()),
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: JwtSigningKey = KEY_A, alg: str | None = None, **override: object) -> str:
    return jwt.encode(
        claims(**override), key.private_key, algorithm=alg or key.alg, headers={"kid": key.kid}
    )


def reason(token: str, audience: str = AUD, bundles: JwtBundleSet = BUNDLES) -> str:
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, bundles, audience, NOW)
    assert not token or token not in str(info.value)
    return info.value.reason


def test_minted_svid_validates() -> None:
    svid = mint_jwt_svid(KEY_A, PAYROLL, [AUD], now=NOW, ttl=timedelta(minutes=5))
    assert svid.expiry == NOW + timedelta(minutes=5)
    assert svid.token not in repr(svid)
    got = validate_jwt_svid(svid.token, BUNDLES, AUD, NOW)
    assert got.spiffe_id == PAYROLL
    assert got.audience == (AUD,)
    assert got.digest == svid.digest and len(got.digest) == 16


@pytest.mark.parametrize("key", [KEY_A, KEY_RSA], ids=["ES256", "RS256"])
def test_allowed_algs(key: JwtSigningKey) -> None:
    assert validate_jwt_svid(sign(key), BUNDLES, AUD, NOW).spiffe_id == PAYROLL


def test_ps256_is_allowed() -> None:
    assert validate_jwt_svid(sign(KEY_RSA, "PS256"), BUNDLES, AUD, NOW).spiffe_id == PAYROLL


def test_bad_alg_none_and_hmac() -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none", headers={"kid": KEY_A.kid})
    assert reason(unsigned) == "jwt_bad_alg"
    hmac = jwt.encode(claims(), "a" * 32, algorithm="HS256", headers={"kid": KEY_A.kid})
    assert reason(hmac) == "jwt_bad_alg"


def test_wrong_audience() -> None:
    assert reason(sign(), audience="spiffe://a.org/svc/other") == "jwt_wrong_audience"
    assert validate_jwt_svid(sign(aud=AUD), BUNDLES, AUD, NOW).audience == (AUD,)


def test_expired_and_missing_exp() -> None:
    assert reason(sign(exp=int(NOW.timestamp()) - 1)) == "jwt_expired"
    assert reason(sign(exp=int(NOW.timestamp()))) == "jwt_expired"
    no_exp = jwt.encode(
        {"sub": str(PAYROLL), "aud": AUD}, KEY_A.private_key, "ES256", headers={"kid": "a-1"}
    )
    assert reason(no_exp) == "jwt_malformed"


def test_foreign_trust_domain() -> None:
    foreign = sign(sub="spiffe://c.org/agent/x")
    assert reason(foreign) == "jwt_unknown_trust_domain"


def test_a_key_of_one_trust_domain_cannot_vouch_for_another() -> None:
    # Signed by a.org's key, claiming a b.org identity: b.org has no such kid.
    assert reason(sign(KEY_A, sub="spiffe://b.org/agent/x")) == "jwt_unknown_key"
    # Same, with the kid forged to b.org's: the signature does not verify.
    forged = jwt.encode(
        claims(sub="spiffe://b.org/agent/x"), KEY_A.private_key, "ES256", headers={"kid": "b-1"}
    )
    assert reason(forged) == "jwt_bad_signature"


def test_bad_subject_and_garbage() -> None:
    assert reason(sign(sub="https://a.org/x")) == "jwt_bad_subject"
    assert reason(sign(sub=None)) == "jwt_bad_subject"
    assert reason("not.a.jwt") == "jwt_malformed"
    assert reason("") == "jwt_malformed"


def test_tampered_claims_fail_the_signature() -> None:
    head, _, sig = sign().split(".")
    body = jwt.utils.base64url_encode(json.dumps(claims(aud=["x", AUD])).encode()).decode()
    assert reason(f"{head}.{body}.{sig}") == "jwt_bad_signature"


def test_bundle_round_trip_and_errors() -> None:
    doc = json.dumps({"keys": [KEY_A.public_jwk(), KEY_RSA.public_jwk(), {"use": "x509-svid"}]})
    bundle = JwtBundle.from_jwks(A, doc)
    assert sorted(bundle.keys) == ["a-1", "a-rsa"]
    token = sign()
    assert validate_jwt_svid(token, JwtBundleSet([bundle]), AUD, NOW).spiffe_id == PAYROLL
    no_kid = {k: v for k, v in KEY_A.public_jwk().items() if k != "kid"}
    bad_docs = [
        "not json",
        "[]",
        json.dumps({"keys": []}),
        json.dumps({"keys": [no_kid]}),
        json.dumps({"keys": [KEY_A.public_jwk(), KEY_A.public_jwk()]}),
        json.dumps({"keys": [{**KEY_A.public_jwk(), "x": "!!"}]}),
    ]
    for doc in bad_docs:
        with pytest.raises(BundleError):
            JwtBundle.from_jwks(A, doc)
    with pytest.raises(BundleError):
        JwtBundleSet([bundle, bundle])


def test_authenticate_bearer() -> None:
    token = sign()
    ok = authenticate_bearer([(b"authorization", b"Bearer " + token.encode())], BUNDLES, AUD, NOW)
    assert not isinstance(ok, JwtSvidError) and ok.spiffe_id == PAYROLL
    cases = {
        "jwt_missing": [],
        "jwt_malformed": [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")],
    }
    for want, headers in cases.items():
        got = authenticate_bearer(headers, BUNDLES, AUD, NOW)
        assert isinstance(got, JwtSvidError) and got.reason == want
    basic = authenticate_bearer([(b"authorization", b"Basic eDp5")], BUNDLES, AUD, NOW)
    assert isinstance(basic, JwtSvidError) and basic.reason == "jwt_missing"
    wrong = authenticate_bearer(
        [(b"authorization", b"bearer " + token.encode())], BUNDLES, "other", NOW
    )
    assert isinstance(wrong, JwtSvidError) and wrong.reason == "jwt_wrong_audience"
