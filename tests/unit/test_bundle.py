"""Trust bundles: PEM, concatenated DER, SPIFFE JWKS, files, and the bundle set."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.identity.bundle import BundleError, TrustBundle, TrustBundleSet
from proxy.identity.spiffe_id import TrustDomain
from tests.pki import TestCA

A = TrustDomain("a.org")
B = TrustDomain("b.org")


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("a.org")


@pytest.fixture(scope="module")
def ca2() -> TestCA:
    return TestCA.create("a.org")  # a second root of the same trust domain (rotation)


def _der(ca: TestCA) -> bytes:
    return ca.cert.public_bytes(serialization.Encoding.DER)


def _b64(ca: TestCA) -> str:
    return base64.b64encode(_der(ca)).decode()


def _jwks(*entries: Any) -> str:
    return json.dumps({"keys": list(entries), "spiffe_sequence": 7})


def _x509_entry(ca: TestCA, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [_b64(ca)]}
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def _version_4(der: bytes) -> bytes:
    at = der.index(b"\xa0\x03\x02\x01\x02") + 4
    return der[:at] + b"\x03" + der[at + 1 :]


JWT_ENTRY = {"use": "jwt-svid", "kty": "EC", "kid": "abc", "crv": "P-256", "x": "AA", "y": "AA"}


# --- formats ----------------------------------------------------------------------


def test_from_pem(ca: TestCA, ca2: TestCA) -> None:
    bundle = TrustBundle.from_pem(A, ca.bundle_pem() + ca2.bundle_pem())
    assert bundle.trust_domain == A
    assert bundle.authorities == (ca.cert, ca2.cert)


def test_from_der_concatenated(ca: TestCA, ca2: TestCA) -> None:
    bundle = TrustBundle.from_der(A, ca.bundle_der() + ca2.bundle_der())
    assert bundle.authorities == (ca.cert, ca2.cert)


def test_from_jwks_made_by_test_pki(ca: TestCA) -> None:
    assert TrustBundle.from_jwks(A, ca.bundle_jwks()).authorities == (ca.cert,)


def test_from_jwks_bytes_and_str(ca: TestCA) -> None:
    text = _jwks(_x509_entry(ca))
    assert TrustBundle.from_jwks(A, text) == TrustBundle.from_jwks(A, text.encode())


JWKS_SELECTION: list[tuple[str, Any]] = [
    # (case, function of (ca, ca2) -> entries); expected: only "ca" is used
    ("jwt-svid entry ignored", lambda ca, ca2: [JWT_ENTRY, _x509_entry(ca)]),
    ("unknown use ignored", lambda ca, ca2: [_x509_entry(ca2, use="x509-svid2"), _x509_entry(ca)]),
    ("use is case-sensitive", lambda ca, ca2: [_x509_entry(ca2, use="X509-SVID"), _x509_entry(ca)]),
    ("unknown kty ignored", lambda ca, ca2: [_x509_entry(ca2, kty="XYZ"), _x509_entry(ca)]),
    ("missing x5c ignored", lambda ca, ca2: [_x509_entry(ca2, x5c=None), _x509_entry(ca)]),
    ("empty x5c ignored", lambda ca, ca2: [_x509_entry(ca2, x5c=[]), _x509_entry(ca)]),
    ("only first x5c value used", lambda ca, ca2: [_x509_entry(ca, x5c=[_b64(ca), _b64(ca2)])]),
]


@pytest.mark.parametrize(("case", "entries"), JWKS_SELECTION, ids=[c for c, _ in JWKS_SELECTION])
def test_from_jwks_selects_x509_svid_entries(
    ca: TestCA, ca2: TestCA, case: str, entries: Any
) -> None:
    bundle = TrustBundle.from_jwks(A, _jwks(*entries(ca, ca2)))
    assert bundle.authorities == (ca.cert,)


def test_from_jwks_keeps_every_x509_entry(ca: TestCA, ca2: TestCA) -> None:
    bundle = TrustBundle.from_jwks(A, _jwks(_x509_entry(ca), JWT_ENTRY, _x509_entry(ca2)))
    assert bundle.authorities == (ca.cert, ca2.cert)


JWKS_ERRORS: list[tuple[str, Any, str]] = [
    ("not JSON", "{nope", "not valid JSON"),
    ("not UTF-8", b"{\xff}", "not valid JSON"),
    ("JSON array", "[]", "must be a JSON object"),
    ("no keys", "{}", '"keys" array'),
    ("keys not an array", '{"keys": {}}', '"keys" array'),
    ("entry not an object", '{"keys": [1]}', r"keys\[0\] is not a JSON object"),
    ("no entries", '{"keys": []}', "no x509-svid authorities"),
    ("only jwt-svid", _jwks(JWT_ENTRY), "no x509-svid authorities"),
    (
        "x5c is a string",
        _jwks({"use": "x509-svid", "kty": "EC", "x5c": "MIIB"}),
        r"x5c must be an array",
    ),
    (
        "x5c is base64url",
        _jwks({"use": "x509-svid", "kty": "EC", "x5c": ["ab-_"]}),
        r"x5c\[0\] is not base64",
    ),
    (
        "x5c is not a certificate",
        _jwks({"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(b"hi").decode()]}),
        r"x5c\[0\] is not a DER certificate",
    ),
    # Found by probing (issue 12 item 18): a hostile partner's bundle file.
    (
        "kty is an array",
        '{"keys":[{"use":"x509-svid","kty":[]}]}',
        "no x509-svid authorities",
    ),
    ("deeply nested", '{"keys":' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    (
        "x5c is not ASCII",
        _jwks({"use": "x509-svid", "kty": "EC", "x5c": ["\u00e9"]}),
        r"x5c\[0\] is not base64",
    ),
    ("a lone surrogate", '{"keys":[{"use":"\\ud800"}]}', "no x509-svid authorities"),
    # Found by tests/fuzz: a version field past v3 raised InvalidVersion.
    (
        "x5c certificate of version 4",
        _jwks(
            {
                "use": "x509-svid",
                "kty": "EC",
                "x5c": [base64.b64encode(_version_4(_der(TestCA.create("a.org")))).decode()],
            }
        ),
        "not a valid X509 version",
    ),
]


@pytest.mark.parametrize(("case", "data", "rule"), JWKS_ERRORS, ids=[c[0] for c in JWKS_ERRORS])
def test_from_jwks_errors(case: str, data: Any, rule: str) -> None:
    with pytest.raises(BundleError, match=rule) as info:
        TrustBundle.from_jwks(A, data)
    assert "a.org" in str(info.value)


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("PEM", lambda ca: ca.bundle_pem()),
        ("PEM after a comment", lambda ca: b"# roots\n" + ca.bundle_pem()),
        ("DER", lambda ca: ca.bundle_der()),
        ("JWKS", lambda ca: ca.bundle_jwks().encode()),
        ("JWKS with leading whitespace", lambda ca: b"\n  " + ca.bundle_jwks().encode()),
    ],
)
def test_from_bytes_detects_format(ca: TestCA, case: str, make: Any) -> None:
    assert TrustBundle.from_bytes(A, make(ca)).authorities == (ca.cert,)


@pytest.mark.parametrize(
    ("case", "call", "rule"),
    [
        ("empty bytes", lambda: TrustBundle.from_bytes(A, b""), "empty"),
        ("whitespace", lambda: TrustBundle.from_bytes(A, b"\n\n"), "empty"),
        ("garbage", lambda: TrustBundle.from_bytes(A, b"garbage"), "SEQUENCE"),
        ("garbage PEM", lambda: TrustBundle.from_pem(A, b"garbage"), "PEM"),
        (
            "PEM without certificates",
            lambda: TrustBundle.from_pem(A, b"-----BEGIN FOO-----\nZm9v\n-----END FOO-----\n"),
            "PEM",
        ),
        ("garbage DER", lambda: TrustBundle.from_der(A, b"\x30\x05abc"), "truncated"),
        ("empty DER", lambda: TrustBundle.from_der(A, b""), "no certificates"),
        (
            "DER of version 4",
            lambda: TrustBundle.from_der(A, _version_4(_der(TestCA.create("a.org")))),
            "not a valid X509 version",
        ),
        ("no authorities", lambda: TrustBundle(A, ()), "has no certificates"),
    ],
)
def test_bad_bundles(case: str, call: Any, rule: str) -> None:
    with pytest.raises(BundleError, match=rule):
        call()


def test_authorities_are_stored_as_tuple(ca: TestCA) -> None:
    bundle = TrustBundle(A, [ca.cert])  # type: ignore[arg-type]
    assert bundle.authorities == (ca.cert,)


def test_to_pem_round_trips(ca: TestCA, ca2: TestCA) -> None:
    bundle = TrustBundle(A, (ca.cert, ca2.cert))
    assert TrustBundle.from_pem(A, bundle.to_pem()) == bundle


# --- files -------------------------------------------------------------------------


def test_load_file(tmp_path: Path, ca: TestCA) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(ca.bundle_jwks())
    assert TrustBundle.load(A, path).authorities == (ca.cert,)
    assert TrustBundle.load(A, str(path)).authorities == (ca.cert,)


def test_load_missing_file_names_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    with pytest.raises(BundleError, match="No such file or directory") as info:
        TrustBundle.load(A, path)
    assert str(path) in str(info.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read trust bundle"):
        TrustBundle.load(A, tmp_path)


def test_load_bad_content_names_path(tmp_path: Path) -> None:
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"")
    with pytest.raises(BundleError, match="empty") as info:
        TrustBundle.load(A, path)
    assert str(path) in str(info.value)


# --- TrustBundleSet ----------------------------------------------------------------


@pytest.fixture(scope="module")
def other() -> TestCA:
    return TestCA.create("b.org")


def test_set_lookup(ca: TestCA, other: TestCA) -> None:
    a_bundle, b_bundle = TrustBundle(A, (ca.cert,)), TrustBundle(B, (other.cert,))
    bundles = TrustBundleSet([a_bundle, b_bundle])
    assert bundles.get(A) is a_bundle
    assert bundles.get(TrustDomain("c.org")) is None
    assert A in bundles and B in bundles
    assert TrustDomain("c.org") not in bundles
    assert "a.org" not in bundles  # keys are TrustDomains, not strings
    assert len(bundles) == 2
    assert list(bundles) == [a_bundle, b_bundle]
    assert bundles.trust_domains == frozenset({A, B})
    assert "a.org: 1" in repr(bundles)


def test_set_rejects_duplicate_trust_domain(ca: TestCA, ca2: TestCA) -> None:
    with pytest.raises(BundleError, match=r"more than one trust bundle for a\.org"):
        TrustBundleSet([TrustBundle(A, (ca.cert,)), TrustBundle(A, (ca2.cert,))])


def test_set_empty() -> None:
    bundles = TrustBundleSet([])
    assert len(bundles) == 0
    assert bundles.all_authorities() == ()


def test_all_authorities_deduplicates(ca: TestCA, ca2: TestCA, other: TestCA) -> None:
    bundles = TrustBundleSet(
        [TrustBundle(A, (ca.cert, ca2.cert)), TrustBundle(B, (other.cert, ca.cert))]
    )
    assert bundles.all_authorities() == (ca.cert, ca2.cert, other.cert)


def test_with_bundle_replaces_and_is_a_new_set(ca: TestCA, ca2: TestCA, other: TestCA) -> None:
    original = TrustBundleSet([TrustBundle(A, (ca.cert,)), TrustBundle(B, (other.cert,))])
    rotated = original.with_bundle(TrustBundle(A, (ca2.cert,)))
    assert rotated.get(A) == TrustBundle(A, (ca2.cert,))
    assert original.get(A) == TrustBundle(A, (ca.cert,))
    assert [b.trust_domain for b in rotated] == [A, B]
    added = original.with_bundle(TrustBundle(TrustDomain("c.org"), (ca.cert,)))
    assert len(added) == 3 and len(original) == 2


def test_fingerprint(ca: TestCA, ca2: TestCA, other: TestCA) -> None:
    one = TrustBundleSet([TrustBundle(A, (ca.cert, ca2.cert)), TrustBundle(B, (other.cert,))])
    same = TrustBundleSet([TrustBundle(B, (other.cert,)), TrustBundle(A, (ca2.cert, ca.cert))])
    assert one.fingerprint() == same.fingerprint()
    assert len(one.fingerprint()) == 64

    changed = one.with_bundle(TrustBundle(A, (ca.cert,)))
    assert changed.fingerprint() != one.fingerprint()
    swapped = TrustBundleSet([TrustBundle(A, (other.cert,)), TrustBundle(B, (ca.cert, ca2.cert))])
    assert swapped.fingerprint() != one.fingerprint()
    assert TrustBundleSet([]).fingerprint() != one.fingerprint()
