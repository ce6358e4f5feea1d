"""Peer SVID verification, above all: trust is scoped to the peer's own trust domain."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

import pytest
from cryptography import x509

from proxy.identity.bundle import TrustBundle, TrustBundleSet
from proxy.identity.spiffe_id import SpiffeId, TrustDomain
from proxy.identity.svid import validate_leaf
from proxy.identity.verify import ChainError, VerifiedSvid, verify_x509_svid
from tests.pki import Issued, TestCA, now

A = TrustDomain("a.org")
B = TrustDomain("b.org")
HOUR = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def a() -> TestCA:
    return TestCA.create("a.org")


@pytest.fixture(scope="module")
def b() -> TestCA:
    return TestCA.create("b.org")


@pytest.fixture(scope="module")
def bundles(a: TestCA, b: TestCA) -> TrustBundleSet:
    """Both trust domains loaded: the setting in which cross-domain forgery matters."""
    return TrustBundleSet([TrustBundle(A, (a.cert,)), TrustBundle(B, (b.cert,))])


def _verify(issued: Issued, bundles: TrustBundleSet, at: dt.datetime | None = None) -> VerifiedSvid:
    return verify_x509_svid(issued.cert, issued.chain, bundles, at or now())


# --- accepted -----------------------------------------------------------------------


def test_direct_from_root(a: TestCA, bundles: TrustBundleSet) -> None:
    issued = a.issue("spiffe://a.org/agent/payroll")
    verified = _verify(issued, bundles)
    assert verified.spiffe_id == SpiffeId.parse("spiffe://a.org/agent/payroll")
    assert verified.leaf == issued.cert
    assert verified.chain == (issued.cert, a.cert)
    assert verified.serial_hex == format(issued.cert.serial_number, "x")
    assert verified.not_after == issued.cert.not_valid_after_utc


def test_via_intermediates(a: TestCA, bundles: TrustBundleSet) -> None:
    lower = a.intermediate().intermediate()
    issued = lower.issue("spiffe://a.org/svc/hr")
    verified = _verify(issued, bundles)
    assert verified.chain == (issued.cert, *lower.chain, a.cert)
    assert len(verified.chain) == 4


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("EKU absent", {"eku": None}),
        ("EKU critical (web PKI would refuse)", {"eku_critical": True}),
        ("empty subject, critical URI SAN", {"empty_subject": True}),
        ("with DNS SANs", {"dns_names": ["hr.payroll.svc"]}),
    ],
)
def test_legitimate_variants_are_accepted(
    a: TestCA, bundles: TrustBundleSet, case: str, kwargs: dict[str, object]
) -> None:
    issued = a.issue("spiffe://a.org/x", **kwargs)  # type: ignore[arg-type]
    assert _verify(issued, bundles).spiffe_id == SpiffeId.parse("spiffe://a.org/x")


def test_rotated_bundle_with_two_roots(a: TestCA) -> None:
    new_root = TestCA.create("a.org")
    bundles = TrustBundleSet([TrustBundle(A, (a.cert, new_root.cert))])
    for ca in (a, new_root):
        issued = ca.issue("spiffe://a.org/x")
        assert _verify(issued, bundles).chain[-1] == ca.cert


# --- cross-trust-domain forgery (invariant 2) ----------------------------------


def _forged_by_root(a: TestCA, b: TestCA) -> Issued:
    """A b.org SVID signed directly by a.org's root."""
    return a.issue("spiffe://b.org/agent/payroll")


def _forged_by_intermediate(a: TestCA, b: TestCA) -> Issued:
    """A b.org SVID signed by an intermediate (claiming b.org) under a.org's root."""
    return a.intermediate(trust_domain="b.org").issue("spiffe://b.org/agent/payroll")


def _forged_by_a_intermediate(a: TestCA, b: TestCA) -> Issued:
    """A b.org SVID signed by an ordinary a.org intermediate."""
    return a.intermediate().issue("spiffe://b.org/agent/payroll")


def _b_cert_under_a_name(a: TestCA, b: TestCA) -> Issued:
    """The reverse: an a.org SVID minted by b.org's root."""
    return b.issue("spiffe://a.org/agent/payroll")


FORGERIES: list[tuple[str, Callable[[TestCA, TestCA], Issued]]] = [
    ("b.org leaf signed by a.org root", _forged_by_root),
    ("b.org leaf via intermediate under a.org root", _forged_by_intermediate),
    ("b.org leaf via a.org intermediate", _forged_by_a_intermediate),
    ("a.org leaf signed by b.org root", _b_cert_under_a_name),
]


@pytest.mark.parametrize(("case", "forge"), FORGERIES, ids=[f[0] for f in FORGERIES])
def test_cross_domain_forgery_is_rejected(
    a: TestCA,
    b: TestCA,
    bundles: TrustBundleSet,
    case: str,
    forge: Callable[[TestCA, TestCA], Issued],
) -> None:
    forged = forge(a, b)
    assert len(bundles) == 2  # the signer's bundle IS loaded; it must not matter
    with pytest.raises(ChainError, match="does not chain to the trust bundle") as info:
        _verify(forged, bundles)
    assert info.value.reason == "untrusted_chain"


@pytest.mark.parametrize(("case", "forge"), FORGERIES, ids=[f[0] for f in FORGERIES])
def test_forgeries_are_otherwise_valid(
    a: TestCA, b: TestCA, case: str, forge: Callable[[TestCA, TestCA], Issued]
) -> None:
    """Control: each forgery verifies when its claimed trust domain's bundle does
    hold the signer's root, so the test above fails only because of scoping."""
    forged = forge(a, b)
    claimed = validate_leaf(forged.cert).trust_domain
    misconfigured = TrustBundleSet([TrustBundle(claimed, (a.cert, b.cert))])
    assert _verify(forged, misconfigured).spiffe_id.trust_domain == claimed


def test_forgery_with_only_signer_bundle_loaded(a: TestCA) -> None:
    forged = a.issue("spiffe://b.org/agent/payroll")
    only_a = TrustBundleSet([TrustBundle(A, (a.cert,))])
    with pytest.raises(ChainError, match=r"no trust bundle for trust domain b\.org") as info:
        _verify(forged, only_a)
    assert info.value.reason == "untrusted_chain"


# --- refused: trust ---------------------------------------------------------------


def _unrelated_ca(a: TestCA) -> tuple[x509.Certificate, Sequence[x509.Certificate]]:
    # Same trust domain name, same subject DN as a.org's real root, other key.
    impostor = TestCA.create("a.org")
    assert impostor.cert.subject == a.cert.subject
    issued = impostor.issue("spiffe://a.org/x")
    return issued.cert, issued.chain


def _missing_intermediate(a: TestCA) -> tuple[x509.Certificate, Sequence[x509.Certificate]]:
    issued = a.intermediate().issue("spiffe://a.org/x")
    return issued.cert, []


def _non_ca_intermediate(a: TestCA) -> tuple[x509.Certificate, Sequence[x509.Certificate]]:
    issued = a.intermediate(ca=False).issue("spiffe://a.org/x")
    return issued.cert, issued.chain


def _intermediate_without_cert_sign(
    a: TestCA,
) -> tuple[x509.Certificate, Sequence[x509.Certificate]]:
    issued = a.intermediate(key_usage_cert_sign=False).issue("spiffe://a.org/x")
    return issued.cert, issued.chain


def _leaf_signed_by_leaf(a: TestCA) -> tuple[x509.Certificate, Sequence[x509.Certificate]]:
    signer = a.issue("spiffe://a.org/signer")
    as_ca = TestCA(trust_domain="a.org", cert=signer.cert, key=signer.key, parent=a)
    issued = as_ca.issue("spiffe://a.org/x")
    return issued.cert, issued.chain


UNTRUSTED = [
    ("unrelated CA with the same name", _unrelated_ca, "does not chain"),
    ("intermediate not sent", _missing_intermediate, "does not chain"),
    ("intermediate with cA=false", _non_ca_intermediate, "does not chain"),
    ("intermediate without keyCertSign", _intermediate_without_cert_sign, "keyCertSign"),
    ("leaf used as a CA", _leaf_signed_by_leaf, "does not chain"),
]


@pytest.mark.parametrize(("case", "make", "rule"), UNTRUSTED, ids=[u[0] for u in UNTRUSTED])
def test_untrusted_chain(
    a: TestCA,
    bundles: TrustBundleSet,
    case: str,
    make: Callable[[TestCA], tuple[x509.Certificate, Sequence[x509.Certificate]]],
    rule: str,
) -> None:
    leaf, intermediates = make(a)
    with pytest.raises(ChainError, match=rule) as info:
        verify_x509_svid(leaf, intermediates, bundles, now())
    assert info.value.reason == "untrusted_chain"


def test_leaf_pinned_as_trust_anchor_is_refused(a: TestCA) -> None:
    issued = a.issue("spiffe://a.org/x")
    pinned = TrustBundleSet([TrustBundle(A, (issued.cert,))])
    with pytest.raises(ChainError, match="itself a trust anchor") as info:
        _verify(issued, pinned)
    assert info.value.reason == "untrusted_chain"


def test_non_ca_root_in_bundle_is_refused() -> None:
    root = TestCA.create("a.org", ca=False)
    issued = root.issue("spiffe://a.org/x")
    with pytest.raises(ChainError) as info:
        _verify(issued, TrustBundleSet([TrustBundle(A, (root.cert,))]))
    assert info.value.reason == "untrusted_chain"


def test_expired_root_is_untrusted() -> None:
    # The anchor's validity is checked by the verifier; only leaf and
    # intermediates get the distinct certificate_expired reason.
    root = TestCA.create("a.org", not_before=now() - 3 * HOUR, not_after=now() - HOUR)
    issued = root.issue("spiffe://a.org/x")
    with pytest.raises(ChainError, match="not valid at validation time") as info:
        _verify(issued, TrustBundleSet([TrustBundle(A, (root.cert,))]))
    assert info.value.reason == "untrusted_chain"


# --- refused: expiry (invariant 7) --------------------------------------------------


def _expired_leaf(a: TestCA) -> Issued:
    return a.issue("spiffe://a.org/x", not_before=now() - 2 * HOUR, not_after=now() - HOUR)


def _future_leaf(a: TestCA) -> Issued:
    return a.issue("spiffe://a.org/x", not_before=now() + HOUR, not_after=now() + 2 * HOUR)


def _expired_intermediate(a: TestCA) -> Issued:
    inter = a.intermediate(not_before=now() - 2 * HOUR, not_after=now() - HOUR)
    return inter.issue("spiffe://a.org/x")


def _future_intermediate(a: TestCA) -> Issued:
    inter = a.intermediate(not_before=now() + HOUR, not_after=now() + 2 * HOUR)
    return inter.issue("spiffe://a.org/x")


EXPIRY = [
    ("expired leaf", _expired_leaf, "leaf: certificate expired at"),
    ("not-yet-valid leaf", _future_leaf, "leaf: certificate not valid before"),
    ("expired intermediate", _expired_intermediate, "intermediate 1 .*certificate expired at"),
    (
        "not-yet-valid intermediate",
        _future_intermediate,
        "intermediate 1 .*certificate not valid before",
    ),
]


@pytest.mark.parametrize(("case", "make", "rule"), EXPIRY, ids=[e[0] for e in EXPIRY])
def test_expiry(
    a: TestCA, bundles: TrustBundleSet, case: str, make: Callable[[TestCA], Issued], rule: str
) -> None:
    with pytest.raises(ChainError, match=rule) as info:
        _verify(make(a), bundles)
    assert info.value.reason == "certificate_expired"


def test_valid_leaf_expires_later(a: TestCA, bundles: TrustBundleSet) -> None:
    issued = a.issue("spiffe://a.org/x")
    _verify(issued, bundles)
    with pytest.raises(ChainError) as info:
        _verify(issued, bundles, at=issued.cert.not_valid_after_utc + dt.timedelta(seconds=1))
    assert info.value.reason == "certificate_expired"


# --- refused: not an SVID ------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "spiffe_id", "kwargs", "rule"),
    [
        ("leaf is a CA", "spiffe://a.org/x", {"ca": True}, "is a CA"),
        ("no URI SAN", None, {}, "exactly one URI SAN"),
        ("two URI SANs", "spiffe://a.org/x", {"extra_uris": ["spiffe://a.org/y"]}, "found 2"),
        ("trust domain ID only", "spiffe://a.org", {}, "no path"),
        (
            "keyCertSign on leaf",
            "spiffe://a.org/x",
            {"key_usage": {"digital_signature", "key_cert_sign"}},
            "keyCertSign",
        ),
        (
            "EKU serverAuth only",
            "spiffe://a.org/x",
            {"eku": (x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,)},
            "clientAuth",
        ),
    ],
)
def test_invalid_svid(
    a: TestCA,
    bundles: TrustBundleSet,
    case: str,
    spiffe_id: str | None,
    kwargs: dict[str, object],
    rule: str,
) -> None:
    issued = a.issue(spiffe_id, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ChainError, match=rule) as info:
        _verify(issued, bundles)
    assert info.value.reason == "invalid_svid"


def test_naive_time_is_a_programming_error(a: TestCA, bundles: TrustBundleSet) -> None:
    issued = a.issue("spiffe://a.org/x")
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_x509_svid(issued.cert, [], bundles, dt.datetime.now())


def test_chain_error_defaults() -> None:
    assert ChainError("x").reason == "untrusted_chain"
    assert ChainError("x", reason="invalid_svid").reason == "invalid_svid"
    assert isinstance(ChainError("x"), ValueError)


# --- accept_verified_path: the checks left after OpenSSL verified a path ----------


def test_fast_path_accepts_an_anchor_of_the_leafs_own_domain(
    a: TestCA, bundles: TrustBundleSet
) -> None:
    from proxy.identity.verify import accept_verified_path

    lower = a.intermediate()
    issued = lower.issue("spiffe://a.org/svc/hr")
    verified = accept_verified_path([issued.cert, *lower.chain, a.cert], bundles, now())
    assert verified is not None and str(verified.spiffe_id) == "spiffe://a.org/svc/hr"


def test_fast_path_declines_a_foreign_anchor(a: TestCA, b: TestCA, bundles: TrustBundleSet) -> None:
    """b.org leaf that chains to a.org's root: not decided here, and the full
    verification the caller then runs rejects it."""
    from proxy.identity.verify import accept_verified_path

    forged = a.issue("spiffe://b.org/agent/payroll")
    assert accept_verified_path([forged.cert, a.cert], bundles, now()) is None
    with pytest.raises(ChainError) as info:
        _verify(forged, bundles)
    assert info.value.reason == "untrusted_chain"
    assert accept_verified_path([forged.cert], bundles, now()) is None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("leaf is a CA", "invalid_svid"),
        ("intermediate lacks keyCertSign", "untrusted_chain"),
        ("expired leaf", "certificate_expired"),
    ],
)
def test_fast_path_still_applies_the_svid_rules(
    a: TestCA, bundles: TrustBundleSet, case: str, reason: str
) -> None:
    from proxy.identity.verify import accept_verified_path

    if case == "leaf is a CA":
        path = [a.issue("spiffe://a.org/x", ca=True).cert, a.cert]
    elif case == "intermediate lacks keyCertSign":
        lower = a.intermediate(key_usage_cert_sign=False)
        path = [lower.issue("spiffe://a.org/x").cert, *lower.chain, a.cert]
    else:
        old = a.issue(
            "spiffe://a.org/x",
            not_before=now() - dt.timedelta(hours=2),
            not_after=now() - dt.timedelta(hours=1),
        )
        path = [old.cert, a.cert]
    with pytest.raises(ChainError) as info:
        accept_verified_path(path, bundles, now())
    assert info.value.reason == reason
