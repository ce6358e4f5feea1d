"""load_snapshot_from_files: one clear, key-free message per broken input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from proxy.identity import TrustDomain
from proxy.sources import IdentityLoadError, load_snapshot_from_files
from tests.pki import Issued, TestCA

B_TD = TrustDomain.parse("b.org")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(directory: Path, issued: Issued, ca: TestCA) -> tuple[Path, Path, Path]:
    cert, key = issued.write(directory, bundle=ca.bundle_pem())
    return cert, key, directory / "bundle.pem"


def test_loads_svid_bundle_and_federation(tmp_path: Path, ca_a: TestCA, ca_b: TestCA) -> None:
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    cert, key, bundle = _write(tmp_path, issued, ca_a)
    (tmp_path / "b.json").write_text(ca_b.bundle_jwks())
    snapshot = load_snapshot_from_files(cert, key, bundle, {B_TD: tmp_path / "b.json"}, _now())
    assert snapshot.local_id == "spiffe://a.org/agent/payroll"
    assert snapshot.svid.serial_hex == format(issued.cert.serial_number, "x")
    assert {str(td) for td in snapshot.bundles.trust_domains} == {"a.org", "b.org"}


def test_intermediates_are_kept(tmp_path: Path, ca_a: TestCA) -> None:
    issued = ca_a.intermediate().issue("spiffe://a.org/agent/payroll")
    cert, key, bundle = _write(tmp_path, issued, ca_a)
    snapshot = load_snapshot_from_files(cert, key, bundle, {}, _now())
    assert len(snapshot.svid.intermediates) == 1


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_key", r"cannot read key .*svid_key\.pem: No such file"),
        ("missing_federated", r"cannot read federated bundle for b\.org .*b\.pem"),
        ("mismatched_key", r"key .*svid_key\.pem: private key does not match"),
        ("truncated_cert", r"certificate .*svid\.pem / key"),
        ("garbage_bundle", r"trust bundle .*bundle\.pem: "),
        ("garbage_federated", r"federated bundle .*b\.pem: "),
        ("federated_own_td", r"federated bundle .*a\.pem: a\.org is our own trust domain"),
        ("wrong_bundle", r"does not verify against our own trust bundle"),
        ("expired", r"not usable now: certificate expired"),
        ("not_yet_valid", r"not usable now: certificate not valid before"),
    ],
)
def test_refuses_with_one_line(
    tmp_path: Path, ca_a: TestCA, ca_b: TestCA, case: str, expected: str
) -> None:
    now = _now()
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    if case == "expired":
        issued = ca_a.issue(
            "spiffe://a.org/x",
            not_before=now - dt.timedelta(hours=2),
            not_after=now - dt.timedelta(minutes=1),
        )
    elif case == "not_yet_valid":
        issued = ca_a.issue(
            "spiffe://a.org/x",
            not_before=now + dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(hours=1),
        )
    cert, key, bundle = _write(tmp_path, issued, ca_a)
    federation: dict[TrustDomain, Path] = {}
    if case == "missing_key":
        key.unlink()
    elif case == "missing_federated":
        federation = {B_TD: tmp_path / "b.pem"}
    elif case == "mismatched_key":
        key.write_bytes(ca_a.issue("spiffe://a.org/other").key_pem())
    elif case == "truncated_cert":
        cert.write_bytes(cert.read_bytes()[:300])
    elif case == "garbage_bundle":
        bundle.write_bytes(b"this is not a bundle\n")
    elif case == "garbage_federated":
        (tmp_path / "b.pem").write_bytes(b"\x30\x82garbage")
        federation = {B_TD: tmp_path / "b.pem"}
    elif case == "federated_own_td":
        (tmp_path / "a.pem").write_bytes(ca_a.bundle_pem())
        federation = {TrustDomain.parse("a.org"): tmp_path / "a.pem"}
    elif case == "wrong_bundle":
        bundle.write_bytes(TestCA.create("a.org").bundle_pem())
    with pytest.raises(IdentityLoadError, match=expected) as info:
        load_snapshot_from_files(cert, key, bundle, federation, now)
    message = str(info.value)
    assert "\n" not in message
    for line in issued.key_pem().decode().splitlines()[1:-1]:
        assert line not in message


def test_key_in_the_certificate_file_is_not_echoed(tmp_path: Path, ca_a: TestCA) -> None:
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    cert, key, bundle = _write(tmp_path, issued, ca_a)
    cert.write_bytes(issued.key_pem())  # an operator swapped the two files
    with pytest.raises(IdentityLoadError) as info:
        load_snapshot_from_files(cert, key, bundle, {}, _now())
    body = "".join(issued.key_pem().decode().splitlines()[1:-1])
    assert body[:40] not in str(info.value)
    for line in issued.key_pem().decode().splitlines()[1:-1]:
        assert line not in str(info.value)
