"""Approval tokens: minted with an approver's SVID, verified against the
approver's own trust domain, bound to one request, usable once."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import jwt
import pytest

from proxy.identity import SpiffeId, TrustBundle, TrustBundleSet, TrustDomain, load_x509_svid
from proxy.identity.svid import X509Svid
from proxy.policy import SpiffePattern
from proxy.policy.approval import (
    ApprovalError,
    ReplayCache,
    body_sha256,
    canonical_json,
    check_high_impact,
    mint_approval,
    verify_approval,
)
from tests.pki import Issued, TestCA, now

REQUESTER = SpiffeId.parse("spiffe://payroll.example/agent/payroll")
APPROVERS = (SpiffePattern.parse("spiffe://payroll.example/approver/*"),)
ARGS = {"amount": 1200, "payee": "ACME", "memo": "März"}
HASH = body_sha256(canonical_json(ARGS))


def svid_of(issued: Issued) -> X509Svid:
    return load_x509_svid(issued.cert_pem(), issued.key_pem())


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("payroll.example")


@pytest.fixture(scope="module")
def bundles(ca: TestCA) -> TrustBundleSet:
    return TrustBundleSet([TrustBundle.from_pem(TrustDomain("payroll.example"), ca.bundle_pem())])


@pytest.fixture(scope="module")
def alice(ca: TestCA) -> X509Svid:
    return svid_of(ca.intermediate().issue("spiffe://payroll.example/approver/alice"))


def verify(token: str | None, bundles: TrustBundleSet, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "bundles": bundles,
        "approvers": APPROVERS,
        "requester": REQUESTER,
        "method": "tools/call",
        "target": "bank.transfer",
        "body_hash": HASH,
        "now": now(),
        "replay": ReplayCache(),
    }
    args.update(kw)
    return verify_approval(token, **args)


def mint(svid: X509Svid, **kw: Any) -> str:
    args: dict[str, Any] = {
        "requester": REQUESTER,
        "method": "tools/call",
        "target": "bank.transfer",
        "body_hash": HASH,
    }
    args.update(kw)
    return mint_approval(
        svid,
        args["requester"],
        args["method"],
        args["target"],
        args["body_hash"],
        now=kw.get("now", now()),
        ttl=kw.get("ttl", 300),
    )


def test_happy_path_then_replay(alice: X509Svid, bundles: TrustBundleSet) -> None:
    token = mint(alice)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["typ"] == "agent-approval+jws"
    assert len(header["x5c"]) == 2  # leaf and intermediate, standard base64 DER
    base64.b64decode(header["x5c"][0], validate=True)
    replay = ReplayCache()
    result = verify(token, bundles, replay=replay)
    assert result.ok and result.reason == "approved" and result.approver == alice.spiffe_id
    again = verify(token, bundles, replay=replay)
    assert (again.ok, again.reason) == (False, "approval_replayed")


def test_missing(bundles: TrustBundleSet) -> None:
    result = verify(None, bundles)
    assert result.reason == "approval_missing"
    assert "spiffe://payroll.example/approver/*" in result.detail
    assert "Agent-Approval" in result.detail


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"body_hash": body_sha256(canonical_json({**ARGS, "amount": 99999}))}, "body_sha256"),
        ({"target": "bank.refund"}, "target"),
        ({"method": "POST"}, "method"),
        ({"requester": SpiffeId.parse("spiffe://payroll.example/agent/other")}, "sub"),
    ],
)
def test_mismatch_says_which(
    alice: X509Svid, bundles: TrustBundleSet, change: dict[str, Any], field: str
) -> None:
    result = verify(mint(alice), bundles, **change)
    assert result.reason == "approval_mismatch" and f"different {field}" in result.detail


def test_canonical_arguments_ignore_key_order(alice: X509Svid, bundles: TrustBundleSet) -> None:
    reordered = dict(reversed(list(ARGS.items())))
    assert verify(mint(alice), bundles, body_hash=body_sha256(canonical_json(reordered))).ok


def test_expired(alice: X509Svid, bundles: TrustBundleSet) -> None:
    token = mint(alice, ttl=60)
    assert verify(token, bundles, now=now() + timedelta(seconds=59)).ok
    result = verify(token, bundles, now=now() + timedelta(seconds=61))
    assert result.reason == "approval_expired"


def test_too_long(alice: X509Svid, bundles: TrustBundleSet) -> None:
    with pytest.raises(ApprovalError, match="at most 300s"):
        mint(alice, ttl=301)
    # A token made by hand, signed by a real approver, for an hour.
    t = int(now().timestamp())
    claims = {
        "iss": str(alice.spiffe_id),
        "sub": str(REQUESTER),
        "htm": "tools/call",
        "target": "bank.transfer",
        "body_sha256": HASH,
        "iat": t,
        "exp": t + 3600,
        "jti": "x",
    }
    token = jwt.PyJWS().encode(
        json.dumps(claims).encode(),
        alice.private_key,
        algorithm="ES256",
        headers={"typ": "agent-approval+jws", "x5c": jwt.get_unverified_header(mint(alice))["x5c"]},
    )
    assert verify(token, bundles).reason == "approval_too_long"


def test_wrong_approver(ca: TestCA, bundles: TrustBundleSet) -> None:
    bob = svid_of(ca.issue("spiffe://payroll.example/agent/bob"))
    result = verify(mint(bob), bundles)
    assert result.reason == "approval_wrong_approver" and "may not approve" in result.detail
    # Nobody approves their own request, even when the pattern would match.
    selfish = svid_of(ca.issue(str(REQUESTER)))
    wide = (SpiffePattern.parse("spiffe://payroll.example/**"),)
    assert verify(mint(selfish), bundles, approvers=wide).reason == "approval_wrong_approver"


def test_untrusted_chain_from_another_ca_in_the_same_trust_domain(
    bundles: TrustBundleSet,
) -> None:
    rogue = TestCA.create("payroll.example")  # same trust domain, not in the bundle
    mallory = svid_of(rogue.issue("spiffe://payroll.example/approver/alice"))
    result = verify(mint(mallory), bundles)
    assert result.reason == "approval_untrusted"


def test_approver_from_an_unknown_trust_domain(bundles: TrustBundleSet) -> None:
    other = TestCA.create("partner.example")
    carol = svid_of(other.issue("spiffe://partner.example/approver/carol"))
    wide = (SpiffePattern.parse("spiffe://partner.example/approver/*"),)
    assert verify(mint(carol), bundles, approvers=wide).reason == "approval_untrusted"


def test_x5c_leaf_id_must_be_iss(alice: X509Svid, bundles: TrustBundleSet) -> None:
    t = int(now().timestamp())
    claims = {
        "iss": "spiffe://payroll.example/approver/bob",
        "sub": str(REQUESTER),
        "htm": "tools/call",
        "target": "bank.transfer",
        "body_sha256": HASH,
        "iat": t,
        "exp": t + 60,
        "jti": "y",
    }
    token = jwt.PyJWS().encode(
        json.dumps(claims).encode(),
        alice.private_key,
        algorithm="ES256",
        headers={"typ": "agent-approval+jws", "x5c": jwt.get_unverified_header(mint(alice))["x5c"]},
    )
    result = verify(token, bundles)
    assert result.reason == "approval_invalid" and "not the signer" in result.detail


def test_tampered_and_garbage(alice: X509Svid, ca: TestCA, bundles: TrustBundleSet) -> None:
    token = mint(alice)
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["body_sha256"] = "0" * 64
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert verify(f"{head}.{forged}.{sig}", bundles).reason == "approval_invalid"
    # Signed by another key than the x5c leaf's.
    other = svid_of(ca.issue("spiffe://payroll.example/approver/dave"))
    swapped = mint(other).split(".")
    assert verify(f"{head}.{swapped[1]}.{swapped[2]}", bundles).reason == "approval_invalid"
    for junk in ("x", "a.b.c", "e30.e30.", "e30." * 3):
        assert verify(junk, bundles).reason == "approval_invalid"


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    cache = ReplayCache(max_entries=2)
    assert cache.add(("i", "1"), 100.0, 0.0) is None
    assert cache.add(("i", "2"), 100.0, 0.0) is None
    assert cache.add(("i", "3"), 100.0, 0.0) == "approval_replay_cache_full"
    assert cache.add(("i", "1"), 100.0, 50.0) == "approval_replayed"
    assert cache.add(("i", "3"), 200.0, 101.0) is None  # expired entries made room


def test_high_impact_fresh_attestation(alice: X509Svid, bundles: TrustBundleSet) -> None:
    common: dict[str, Any] = {
        "bundles": bundles,
        "requester": REQUESTER,
        "method": "tools/call",
        "target": "bank.transfer",
        "body_hash": HASH,
        "now": now(),
        "replay": ReplayCache(),
    }
    fresh = check_high_impact(
        max_svid_age=300, approvers=(), svid_age_seconds=10, token=None, **common
    )
    assert fresh.ok
    stale = check_high_impact(
        max_svid_age=300, approvers=(), svid_age_seconds=900, token=None, **common
    )
    assert stale.reason == "attestation_stale" and "less than 300s" in stale.detail
    unknown = check_high_impact(
        max_svid_age=300, approvers=(), svid_age_seconds=None, token=None, **common
    )
    assert unknown.reason == "attestation_unknown"
    both = check_high_impact(
        max_svid_age=300, approvers=APPROVERS, svid_age_seconds=10, token=None, **common
    )
    assert both.reason == "approval_missing"
    token = mint(alice)
    assert check_high_impact(
        max_svid_age=300, approvers=APPROVERS, svid_age_seconds=10, token=token, **common
    ).ok


def test_a_certificate_past_v3_in_x5c_is_a_refusal(
    alice: X509Svid, bundles: TrustBundleSet
) -> None:
    # Found by the fuzz harness: cryptography raises InvalidVersion (not a
    # ValueError) for a version field past v3; it must not escape the gate.
    x5c = jwt.get_unverified_header(mint(alice))["x5c"]
    der = base64.b64decode(x5c[0])
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2 (v3) in the TBSCertificate
    assert der.count(v3) == 1
    bad = base64.b64encode(der.replace(v3, b"\xa0\x03\x02\x01\x03")).decode()
    token = jwt.PyJWS().encode(
        b"{}",
        alice.private_key,
        algorithm="ES256",
        headers={"typ": "agent-approval+jws", "x5c": [bad, *x5c[1:]]},
    )
    result = verify(token, bundles)
    assert result.reason == "approval_invalid" and "malformed" in result.detail
