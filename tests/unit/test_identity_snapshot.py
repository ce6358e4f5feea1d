"""The identity snapshot: whole-set checks, fingerprints, log fields."""

from __future__ import annotations

import datetime as dt

import pytest

from proxy.identity import (
    IdentityLoadError,
    TrustBundle,
    TrustDomain,
    X509Svid,
    build_snapshot,
    describe_snapshot,
    load_x509_svid,
    snapshot_fingerprint,
)
from tests.pki import Issued, TestCA


def _svid(issued: Issued) -> X509Svid:
    return load_x509_svid(issued.cert_pem(), issued.key_pem())


def _td(ca: TestCA) -> TrustDomain:
    return TrustDomain.parse(ca.trust_domain)


def _bundle(ca: TestCA) -> TrustBundle:
    return TrustBundle.from_pem(_td(ca), ca.bundle_pem())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- build_snapshot --------------------------------------------------------------


def test_build_snapshot_accepts_a_consistent_set(ca_a: TestCA, ca_b: TestCA) -> None:
    svid = _svid(ca_a.issue("spiffe://a.org/agent/payroll"))
    snapshot = build_snapshot(svid, _bundle(ca_a), [_bundle(ca_b)], _now(), origin="test")
    assert snapshot.local_id == "spiffe://a.org/agent/payroll"
    assert {str(td) for td in snapshot.bundles.trust_domains} == {"a.org", "b.org"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("expired", "not usable now"),
        ("not_yet_valid", "not usable now"),
        ("bundle_of_other_td", "the bundle is for b.org"),
        ("federated_own_td", "federated bundle is for our own trust domain"),
        ("wrong_ca", "does not verify against our own trust bundle"),
    ],
)
def test_build_snapshot_refuses(ca_a: TestCA, ca_b: TestCA, case: str, expected: str) -> None:
    now = _now()
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    own, federated = _bundle(ca_a), [_bundle(ca_b)]
    if case == "expired":
        issued = ca_a.issue(
            "spiffe://a.org/x",
            not_before=now - dt.timedelta(hours=2),
            not_after=now - dt.timedelta(hours=1),
        )
    elif case == "not_yet_valid":
        issued = ca_a.issue(
            "spiffe://a.org/x",
            not_before=now + dt.timedelta(hours=1),
            not_after=now + dt.timedelta(hours=2),
        )
    elif case == "bundle_of_other_td":
        own = _bundle(ca_b)
        federated = []
    elif case == "federated_own_td":
        federated = [_bundle(ca_a)]
    elif case == "wrong_ca":
        impostor = TestCA.create("a.org")
        own = TrustBundle.from_pem(_td(ca_a), impostor.bundle_pem())
    with pytest.raises(IdentityLoadError, match=expected) as info:
        build_snapshot(_svid(issued), own, federated, now, origin="origin-name")
    assert str(info.value).startswith("origin-name: ")
    assert "\n" not in str(info.value)


def test_fingerprint_tracks_chain_and_bundles(ca_a: TestCA, ca_b: TestCA) -> None:
    now = _now()
    svid = _svid(ca_a.issue("spiffe://a.org/agent/payroll"))
    one = build_snapshot(svid, _bundle(ca_a), [], now, origin="t")
    same = build_snapshot(svid, _bundle(ca_a), [], now, origin="t")
    federated = build_snapshot(svid, _bundle(ca_a), [_bundle(ca_b)], now, origin="t")
    other = build_snapshot(
        _svid(ca_a.issue("spiffe://a.org/agent/payroll")), _bundle(ca_a), [], now, origin="t"
    )
    assert snapshot_fingerprint(one) == snapshot_fingerprint(same)
    assert snapshot_fingerprint(one) != snapshot_fingerprint(federated)
    assert snapshot_fingerprint(one) != snapshot_fingerprint(other)
    described = describe_snapshot(federated)
    assert described["trust_domains"] == ["a.org", "b.org"]
    assert "PRIVATE" not in repr(described)
