"""X509-SVID rules (sections 2-5), certificate/key loading and validity checks."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.identity.spiffe_id import SpiffeId
from proxy.identity.svid import (
    SvidError,
    X509Svid,
    check_validity,
    load_certificates,
    load_private_key,
    load_x509_svid,
    validate_leaf,
    validate_signing_cert,
)
from tests.pki import CLIENT_AUTH, SERVER_AUTH, TestCA, new_key, now

ID = "spiffe://a.org/agent/payroll"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("a.org")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --- leaf rules ---------------------------------------------------------------

VALID_LEAVES: list[tuple[str, dict[str, Any]]] = [
    ("default profile", {}),
    ("EKU absent is allowed", {"eku": None}),
    ("EKU critical is allowed", {"eku_critical": True}),
    (
        "EKU with an extra purpose",
        {"eku": (SERVER_AUTH, CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING)},
    ),
    (
        "keyEncipherment and keyAgreement are allowed",
        {"key_usage": {"digital_signature", "key_encipherment", "key_agreement"}},
    ),
    ("DNS SANs are allowed next to the URI SAN", {"dns_names": ["payroll.local"]}),
    ("empty subject with a critical SAN", {"empty_subject": True}),
]


@pytest.mark.parametrize(("case", "kwargs"), VALID_LEAVES, ids=[c for c, _ in VALID_LEAVES])
def test_valid_leaf(ca: TestCA, case: str, kwargs: dict[str, Any]) -> None:
    leaf = ca.issue(ID, **kwargs)
    assert validate_leaf(leaf.cert) == SpiffeId.parse(ID)


INVALID_LEAVES: list[tuple[str, str | None, dict[str, Any], str]] = [
    ("no SAN at all", None, {}, "exactly one URI SAN, found 0"),
    ("DNS SAN but no URI SAN", None, {"dns_names": ["x.local"]}, "exactly one URI SAN, found 0"),
    ("two URI SANs", ID, {"extra_uris": ["spiffe://a.org/other"]}, "found 2"),
    ("SPIFFE and https URI SANs", ID, {"extra_uris": ["https://a.org/x"]}, "found 2"),
    ("non-spiffe URI SAN", "https://a.org/agent", {}, "not a SPIFFE ID.*scheme"),
    ("malformed SPIFFE ID", "spiffe://A.org/x", {}, "not a SPIFFE ID.*uppercase"),
    ("trust-domain-only ID", "spiffe://a.org", {}, "has no path"),
    ("basicConstraints cA=true", ID, {"ca": True}, "is a CA"),
    ("keyUsage missing", ID, {"key_usage": None}, "keyUsage extension is missing"),
    (
        "keyUsage without digitalSignature",
        ID,
        {"key_usage": {"key_encipherment"}},
        "must include digitalSignature",
    ),
    (
        "keyUsage with keyCertSign",
        ID,
        {"key_usage": {"digital_signature", "key_cert_sign"}},
        "must not include keyCertSign",
    ),
    (
        "keyUsage with cRLSign",
        ID,
        {"key_usage": {"digital_signature", "crl_sign"}},
        "must not include cRLSign",
    ),
    ("EKU serverAuth only", ID, {"eku": (SERVER_AUTH,)}, "missing clientAuth"),
    ("EKU clientAuth only", ID, {"eku": (CLIENT_AUTH,)}, "missing serverAuth"),
    (
        "EKU with neither",
        ID,
        {"eku": (ExtendedKeyUsageOID.CODE_SIGNING,)},
        "missing serverAuth and clientAuth",
    ),
]


@pytest.mark.parametrize(
    ("case", "spiffe_id", "kwargs", "rule"), INVALID_LEAVES, ids=[c[0] for c in INVALID_LEAVES]
)
def test_invalid_leaf(
    ca: TestCA, case: str, spiffe_id: str | None, kwargs: dict[str, Any], rule: str
) -> None:
    leaf = ca.issue(spiffe_id, **kwargs)
    with pytest.raises(SvidError, match=rule) as info:
        validate_leaf(leaf.cert)
    assert info.value.reason == "invalid_svid"


def test_leaf_answers_are_remembered_by_the_certificates_bytes(ca: TestCA) -> None:
    """A peer presents the same SVID on every connection: the rules run once
    per certificate (by DER), and a refusal is never remembered as a pass."""
    leaf = ca.issue(ID)
    validate_leaf(leaf.cert)
    hits = validate_leaf.cache_info().hits
    again = x509.load_der_x509_certificate(_der(leaf.cert))  # a new object, same bytes
    assert again is not leaf.cert
    assert validate_leaf(again) == SpiffeId.parse(ID)
    assert validate_leaf.cache_info().hits == hits + 1
    bad = ca.issue(None)
    for _ in range(2):
        with pytest.raises(SvidError):
            validate_leaf(bad.cert)


# --- signing certificate rules --------------------------------------------------

SIGNING_CASES: list[tuple[str, Callable[[TestCA], x509.Certificate], str | None]] = [
    ("root", lambda ca: ca.cert, None),
    ("intermediate", lambda ca: ca.intermediate().cert, None),
    ("intermediate with cA=false", lambda ca: ca.intermediate(ca=False).cert, "is not a CA"),
    (
        "intermediate without keyCertSign",
        lambda ca: ca.intermediate(key_usage_cert_sign=False).cert,
        "must include keyCertSign",
    ),
    ("a leaf", lambda ca: ca.issue(ID).cert, "is not a CA"),
    ("a CA leaf without keyCertSign", lambda ca: ca.issue(ID, ca=True).cert, "keyCertSign"),
]


@pytest.mark.parametrize(("case", "make", "rule"), SIGNING_CASES, ids=[c[0] for c in SIGNING_CASES])
def test_signing_cert(
    ca: TestCA, case: str, make: Callable[[TestCA], x509.Certificate], rule: str | None
) -> None:
    cert = make(ca)
    if rule is None:
        validate_signing_cert(cert)
    else:
        with pytest.raises(SvidError, match=rule):
            validate_signing_cert(cert)


# --- loading certificates ------------------------------------------------------


def test_load_pem_keeps_order(ca: TestCA) -> None:
    inter = ca.intermediate()
    leaf = inter.issue(ID)
    certs = load_certificates(leaf.cert_pem())
    assert certs == [leaf.cert, inter.cert]


def test_load_concatenated_der(ca: TestCA) -> None:
    inter = ca.intermediate().intermediate()
    leaf = inter.issue(ID)
    certs = load_certificates(leaf.cert_der())
    assert certs == [leaf.cert, *inter.chain]
    assert len(certs) == 3


def test_load_single_der(ca: TestCA) -> None:
    assert load_certificates(_der(ca.cert)) == [ca.cert]


def _garbage_cases() -> list[tuple[str, bytes, str]]:
    # Built at collection time, so it gets its own CA rather than the fixture.
    pki = TestCA.create("g.org")
    der = _der(pki.cert)
    key_pem = pki.issue(ID).key_pem()
    return [
        ("empty", b"", "empty"),
        ("whitespace", b" \n\t", "empty"),
        ("text", b"hello world", "expected a SEQUENCE"),
        (
            "bad PEM body",
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "PEM",
        ),
        ("PEM with only a key", key_pem, "PEM"),
        ("truncated DER", der[:-1], "truncated"),
        ("DER with trailing garbage", der + b"\x00\x01", "expected a SEQUENCE"),
        ("indefinite length", b"\x30\x80" + der[2:], "length"),
        ("SEQUENCE that is not a certificate", b"\x30\x03\x02\x01\x01", "not a valid DER"),
        # Found by tests/fuzz: cryptography raises InvalidVersion (not a
        # ValueError) for a version field past v3.
        ("DER version 4", _version_4(der), "not a valid X509 version"),
        ("PEM version 4", _pem(_version_4(der)), "not a valid X509 version"),
    ]


def _version_4(der: bytes) -> bytes:
    """``der`` with its version field (v3, encoded 2) set to 3."""
    at = der.index(b"\xa0\x03\x02\x01\x02") + 4
    return der[:at] + b"\x03" + der[at + 1 :]


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


GARBAGE = _garbage_cases()


@pytest.mark.parametrize(("case", "data", "rule"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_load_certificates_rejects_garbage(case: str, data: bytes, rule: str) -> None:
    with pytest.raises(SvidError, match=rule):
        load_certificates(data)


# --- loading keys ----------------------------------------------------------------

_PKCS8 = serialization.PrivateFormat.PKCS8
_TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL
_PEM = serialization.Encoding.PEM
_DER = serialization.Encoding.DER


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY_FORMATS = [
    ("EC PKCS#8 PEM", new_key, _PEM, _PKCS8),
    ("EC SEC1 PEM", new_key, _PEM, _TRADITIONAL),
    ("EC PKCS#8 DER", new_key, _DER, _PKCS8),
    ("EC SEC1 DER", new_key, _DER, _TRADITIONAL),
    ("RSA PKCS#1 PEM", _rsa, _PEM, _TRADITIONAL),
    ("RSA PKCS#8 DER", _rsa, _DER, _PKCS8),
    ("Ed25519 PKCS#8 PEM", ed25519.Ed25519PrivateKey.generate, _PEM, _PKCS8),
]


@pytest.mark.parametrize(
    ("case", "make", "encoding", "fmt"), KEY_FORMATS, ids=[k[0] for k in KEY_FORMATS]
)
def test_load_private_key_formats(
    case: str,
    make: Callable[[], Any],
    encoding: serialization.Encoding,
    fmt: serialization.PrivateFormat,
) -> None:
    key = make()
    data = key.private_bytes(encoding, fmt, serialization.NoEncryption())
    loaded = load_private_key(data)
    assert loaded.public_key().public_bytes(
        _DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(_DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_secret_lines(data: bytes) -> list[str]:
    return [line for line in data.decode().splitlines() if line and not line.startswith("-----")]


def test_encrypted_key_is_refused_without_echo() -> None:
    data = new_key().private_bytes(
        _PEM, _PKCS8, serialization.BestAvailableEncryption(b"secret-password")
    )
    with pytest.raises(SvidError, match="encrypted") as info:
        load_private_key(data)
    assert info.value.__cause__ is None
    for line in _key_secret_lines(data):
        assert line not in str(info.value)


def test_garbled_key_message_has_no_key_material() -> None:
    data = new_key().private_bytes(_PEM, _PKCS8, serialization.NoEncryption())
    lines = data.decode().splitlines()
    garbled = "\n".join([lines[0], lines[1][:-4] + "AAAA", *lines[2:]]).encode()
    with pytest.raises(SvidError, match="cannot parse private key") as info:
        load_private_key(garbled)
    assert info.value.__cause__ is None and info.value.__context__ is not None
    for line in _key_secret_lines(garbled):
        assert line[:16] not in str(info.value)


X448_SHORT_KEY = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VvBCIEIOO2S75ADFNzP3+yEFrwKL/Q4eLjsyK/hnYzT91K+i8S
-----END PRIVATE KEY-----
"""


@pytest.mark.parametrize(
    ("case", "data", "rule"),
    [
        ("empty", b"", "empty"),
        ("text", b"not a key", "cannot parse private key"),
        (
            "X25519 key",
            x25519.X25519PrivateKey.generate().private_bytes(
                _PEM, _PKCS8, serialization.NoEncryption()
            ),
            "unsupported private key type X25519",
        ),
        # Found by tests/fuzz/test_fuzz_svid.py: OpenSSL refuses this X448
        # key (32 bytes where X448 takes 56) with cryptography's InternalError.
        ("X448 key of the wrong length", X448_SHORT_KEY, "cannot parse private key"),
    ],
)
def test_load_private_key_rejects(case: str, data: bytes, rule: str) -> None:
    with pytest.raises(SvidError, match=rule):
        load_private_key(data)


# --- load_x509_svid -----------------------------------------------------------


def test_load_svid_pem_with_intermediate(ca: TestCA) -> None:
    inter = ca.intermediate()
    issued = inter.issue(ID)
    svid = load_x509_svid(issued.cert_pem(), issued.key_pem())
    assert svid.spiffe_id == SpiffeId.parse(ID)
    assert svid.leaf == issued.cert
    assert svid.intermediates == (inter.cert,)
    assert svid.chain == (issued.cert, inter.cert)
    assert svid.serial_hex == format(issued.cert.serial_number, "x")
    assert not svid.serial_hex.startswith("0x")
    assert svid.leaf_der == _der(issued.cert)
    assert svid.not_before == issued.cert.not_valid_before_utc
    assert svid.not_after.tzinfo is not None
    assert svid.not_before < now() < svid.not_after


def test_load_svid_der(ca: TestCA) -> None:
    issued = ca.issue(ID)
    key_der = issued.key.private_bytes(_DER, _PKCS8, serialization.NoEncryption())
    svid = load_x509_svid(issued.cert_der(), key_der)
    assert svid.spiffe_id == SpiffeId.parse(ID)
    assert svid.intermediates == ()


def test_svid_repr_has_no_key(ca: TestCA) -> None:
    issued = ca.issue(ID)
    svid = load_x509_svid(issued.cert_pem(), issued.key_pem())
    text = repr(svid)
    assert "private_key" not in text
    assert "PRIVATE" not in text
    assert ID in text


def test_svid_equality_ignores_key_object(ca: TestCA) -> None:
    issued = ca.issue(ID)
    first = load_x509_svid(issued.cert_pem(), issued.key_pem())
    second = load_x509_svid(issued.cert_pem(), issued.key_pem())
    assert first == second
    assert isinstance(first, X509Svid)


def test_key_mismatch(ca: TestCA) -> None:
    issued = ca.issue(ID)
    other = ca.issue(ID)
    with pytest.raises(SvidError, match="private key does not match the certificate") as info:
        load_x509_svid(issued.cert_pem(), other.key_pem())
    for line in _key_secret_lines(other.key_pem()):
        assert line not in str(info.value)


@pytest.mark.parametrize(
    ("case", "kwargs", "rule"),
    [
        ("intermediate with cA=false", {"ca": False}, "intermediate 1: .*is not a CA"),
        (
            "intermediate without keyCertSign",
            {"key_usage_cert_sign": False},
            "intermediate 1: .*keyCertSign",
        ),
    ],
)
def test_load_svid_bad_intermediate(
    ca: TestCA, case: str, kwargs: dict[str, Any], rule: str
) -> None:
    issued = ca.intermediate(**kwargs).issue(ID)
    with pytest.raises(SvidError, match=rule):
        load_x509_svid(issued.cert_pem(), issued.key_pem())


def test_load_svid_bad_leaf(ca: TestCA) -> None:
    issued = ca.issue("spiffe://a.org")
    with pytest.raises(SvidError, match="has no path"):
        load_x509_svid(issued.cert_pem(), issued.key_pem())


def test_load_svid_chain_out_of_order(ca: TestCA) -> None:
    lower = ca.intermediate().intermediate()
    issued = lower.issue(ID)
    upper = lower.chain[1]
    pem = b"".join(c.public_bytes(_PEM) for c in [issued.cert, upper, lower.cert])
    with pytest.raises(SvidError, match="certificate 0 is not issued by certificate 1"):
        load_x509_svid(pem, issued.key_pem())


def test_load_svid_garbage_pem(ca: TestCA) -> None:
    with pytest.raises(SvidError, match="PEM"):
        load_x509_svid(b"-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n", b"")


def test_load_svid_garbage_key(ca: TestCA) -> None:
    issued = ca.issue(ID)
    with pytest.raises(SvidError, match="cannot parse private key"):
        load_x509_svid(
            issued.cert_pem(), b"-----BEGIN PRIVATE KEY-----\nZm9v\n-----END PRIVATE KEY-----\n"
        )


# --- validity -----------------------------------------------------------------


def _leaf_with(ca: TestCA, not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    return ca.issue(ID, not_before=not_before, not_after=not_after).cert


def test_check_validity_inside_and_at_the_edges(ca: TestCA) -> None:
    t = now().replace(microsecond=0)
    cert = _leaf_with(ca, t - dt.timedelta(hours=1), t + dt.timedelta(hours=1))
    check_validity(cert, t)
    check_validity(cert, cert.not_valid_before_utc)  # RFC 5280: both ends inclusive
    check_validity(cert, cert.not_valid_after_utc)


@pytest.mark.parametrize(
    ("case", "offset", "rule"),
    [
        ("one second before notBefore", dt.timedelta(seconds=-1), "certificate not valid before"),
        ("one second after notAfter", dt.timedelta(hours=2, seconds=1), "certificate expired at"),
    ],
)
def test_check_validity_outside(ca: TestCA, case: str, offset: dt.timedelta, rule: str) -> None:
    t = now().replace(microsecond=0)
    cert = _leaf_with(ca, t, t + dt.timedelta(hours=2))
    with pytest.raises(SvidError, match=rule) as info:
        check_validity(cert, t + offset)
    assert info.value.reason == "certificate_expired"
    assert "Z" in str(info.value)


def test_check_validity_needs_aware_time(ca: TestCA) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check_validity(ca.cert, dt.datetime.now())


def test_svid_error_reason() -> None:
    assert SvidError("x").reason == "invalid_svid"
    assert SvidError("x", reason="certificate_expired").reason == "certificate_expired"
    assert isinstance(SvidError("x"), ValueError)


def test_loaded_key_keeps_its_type(ca: TestCA) -> None:
    key = load_private_key(ca.issue(ID).key_pem())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
