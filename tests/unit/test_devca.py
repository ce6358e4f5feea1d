"""The embedded dev CA: files, modes, and SVIDs that pass our own checks."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.devca import (
    CLOCK_SKEW,
    DevCA,
    DevCAError,
    IssuedSvid,
    write_svid_files,
)
from proxy.errors import UsageError
from proxy.fileutil import write_atomic
from proxy.identity import (
    ChainError,
    SpiffeId,
    TrustBundle,
    TrustBundleSet,
    TrustDomain,
    load_x509_svid,
    validate_leaf,
    verify_x509_svid,
)
from tests.unit.test_svid import X448_SHORT_KEY

TD = TrustDomain.parse("payroll.example")
OTHER_TD = TrustDomain.parse("marketing.example")
AGENT = SpiffeId.parse("spiffe://payroll.example/agent/payroll")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> DevCA:
    return DevCA.init(tmp_path / "ca", TD)


# -- init / load -------------------------------------------------------------


def test_init_writes_files_with_private_modes(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "ca"
    DevCA.init(directory, TD)
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca_key.pem") == 0o600
    assert _mode(directory / "ca.pem") == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca.pem", "ca_key.pem"]


def test_init_key_is_private_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        DevCA.init(tmp_path / "ca", TD)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ca" / "ca_key.pem") == 0o600


def test_init_refuses_to_overwrite(tmp_path: Path, ca: DevCA) -> None:
    before = (ca.directory / "ca.pem").read_bytes()
    with pytest.raises(DevCAError, match=r"already exists.*--force"):
        DevCA.init(ca.directory, TD)
    assert (ca.directory / "ca.pem").read_bytes() == before


def test_init_refuses_when_only_the_key_exists(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    (directory / "ca_key.pem").write_bytes(b"precious")
    with pytest.raises(DevCAError, match="already exists"):
        DevCA.init(directory, TD)
    assert (directory / "ca_key.pem").read_bytes() == b"precious"


def test_init_force_replaces(ca: DevCA) -> None:
    replaced = DevCA.init(ca.directory, OTHER_TD, force=True)
    assert replaced.trust_domain == OTHER_TD
    assert DevCA.load(ca.directory).trust_domain == OTHER_TD
    assert _mode(ca.directory / "ca_key.pem") == 0o600


def test_root_certificate_profile(ca: DevCA) -> None:
    cert = x509.load_pem_x509_certificate((ca.directory / "ca.pem").read_bytes())
    assert cert.subject == cert.issuer
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://payroll.example"]
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert "agent-mtls-proxy dev CA" in cert.subject.rfc4514_string()
    cert.verify_directly_issued_by(cert)


def test_init_ttl(tmp_path: Path) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    ca = DevCA.init(tmp_path / "ca", TD, ttl=timedelta(days=10), now=now)
    assert ca.not_after == now + timedelta(days=10)


def test_load_round_trips(ca: DevCA) -> None:
    loaded = DevCA.load(ca.directory)
    assert loaded.trust_domain == TD
    assert loaded.cert_pem == ca.cert_pem


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DevCAError, match="ca init"):
        DevCA.load(tmp_path / "nope")


def test_load_missing_key(ca: DevCA) -> None:
    (ca.directory / "ca_key.pem").unlink()
    with pytest.raises(DevCAError, match=r"ca_key\.pem not found"):
        DevCA.load(ca.directory)


def test_load_mismatched_key(tmp_path: Path, ca: DevCA) -> None:
    other = DevCA.init(tmp_path / "other", TD)
    (ca.directory / "ca_key.pem").write_bytes((other.directory / "ca_key.pem").read_bytes())
    with pytest.raises(DevCAError, match="does not match"):
        DevCA.load(ca.directory)


def test_load_garbage_key_does_not_echo_it(ca: DevCA) -> None:
    (ca.directory / "ca_key.pem").write_bytes(b"SECRET-MATERIAL")
    with pytest.raises(DevCAError) as info:
        DevCA.load(ca.directory)
    assert "SECRET" not in str(info.value)


# Found by tests/fuzz/test_fuzz_devca.py: an EC key naming a curve OID that
# cryptography does not support raised UnsupportedAlgorithm, not DevCAError.
UNSUPPORTED_CURVE_KEY = b"""-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIK1Njue+kbFaC02GPpuAFZTRP13AynkUIBrweYrqfxkyoAoGCCqGSM49
CwEHoUQDQgAEOUi156DjOYpIv3DlTdk1Njctw60x8mcG/bABqIgX4dBIj6nZmGpT
yuBhhJ3vwrxG00iAVfTVSChP49D1vIWXZg==
-----END EC PRIVATE KEY-----
"""


def test_load_key_on_an_unsupported_curve(ca: DevCA) -> None:
    (ca.directory / "ca_key.pem").write_bytes(UNSUPPORTED_CURVE_KEY)
    with pytest.raises(DevCAError, match="is not an unencrypted PEM private key"):
        DevCA.load(ca.directory)


def test_load_a_key_openssl_refuses(ca: DevCA) -> None:
    (ca.directory / "ca_key.pem").write_bytes(X448_SHORT_KEY)  # InternalError inside
    with pytest.raises(DevCAError, match="is not an unencrypted PEM private key"):
        DevCA.load(ca.directory)


def test_load_unreadable_key(ca: DevCA) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    os.chmod(ca.directory / "ca_key.pem", 0)
    with pytest.raises(DevCAError, match="cannot read"):
        DevCA.load(ca.directory)


def test_errors_are_usage_errors() -> None:
    assert issubclass(DevCAError, UsageError)


# -- issue ---------------------------------------------------------------------


def test_issued_leaf_passes_our_svid_rules(ca: DevCA, tmp_path: Path) -> None:
    issued = ca.issue(AGENT)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert validate_leaf(leaf) == AGENT
    svid = load_x509_svid(issued.cert_pem, issued.key_pem)
    assert svid.spiffe_id == AGENT
    assert svid.intermediates == ()

    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_bytes(issued.bundle_pem)
    bundles = TrustBundleSet([TrustBundle.load(TD, bundle_file)])
    verified = verify_x509_svid(leaf, [], bundles, datetime.now(UTC))
    assert verified.spiffe_id == AGENT


def test_issued_leaf_does_not_chain_to_another_ca(ca: DevCA, tmp_path: Path) -> None:
    other = DevCA.init(tmp_path / "other", TD)
    leaf = x509.load_pem_x509_certificate(ca.issue(AGENT).cert_pem)
    bundle_file = tmp_path / "other.pem"
    bundle_file.write_bytes(other.cert_pem)
    bundles = TrustBundleSet([TrustBundle.load(TD, bundle_file)])
    with pytest.raises(ChainError):
        verify_x509_svid(leaf, [], bundles, datetime.now(UTC))


def test_leaf_profile(ca: DevCA) -> None:
    issued = ca.issue(AGENT)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    ext = leaf.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(AGENT)]
    assert len(list(san)) == 1
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.serial_number.bit_length() <= 128
    assert format(leaf.serial_number, "x") == issued.serial_hex
    assert leaf.issuer == ca.certificate.subject
    leaf.verify_directly_issued_by(ca.certificate)


def test_serials_are_random(ca: DevCA) -> None:
    serials = {ca.issue(AGENT).serial_hex for _ in range(5)}
    assert len(serials) == 5


def test_ttl_respected(ca: DevCA) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    issued = ca.issue(AGENT, ttl=timedelta(minutes=5), now=now)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert leaf.not_valid_after_utc == now + timedelta(minutes=5)
    assert issued.not_after == leaf.not_valid_after_utc
    assert leaf.not_valid_before_utc == now - CLOCK_SKEW


def test_default_ttl_is_one_hour(ca: DevCA) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    issued = ca.issue(AGENT, now=now)
    assert issued.not_after == now + timedelta(hours=1)


def test_ttl_capped_at_ca_expiry(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    ca = DevCA.init(tmp_path / "ca", TD, ttl=timedelta(hours=2), now=now)
    issued = ca.issue(AGENT, ttl=timedelta(days=30), now=now)
    assert issued.not_after == ca.not_after == now + timedelta(hours=2)


def test_issue_after_ca_expiry_refused(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca = DevCA.init(tmp_path / "ca", TD, ttl=timedelta(hours=1), now=now)
    with pytest.raises(DevCAError, match="expired"):
        ca.issue(AGENT, now=now + timedelta(hours=2))


def test_issue_before_ca_validity_refused(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca = DevCA.init(tmp_path / "ca", TD, now=now)
    with pytest.raises(DevCAError, match="not valid before"):
        ca.issue(AGENT, now=now - timedelta(hours=1))


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_non_positive_ttl_refused(ca: DevCA, ttl: timedelta) -> None:
    with pytest.raises(DevCAError, match="positive"):
        ca.issue(AGENT, ttl=ttl)


def test_id_outside_trust_domain_refused(ca: DevCA) -> None:
    with pytest.raises(DevCAError, match=r"not in the CA's trust domain payroll\.example"):
        ca.issue(SpiffeId.parse("spiffe://marketing.example/agent/ads"))


def test_trust_domain_id_refused_as_leaf(ca: DevCA) -> None:
    with pytest.raises(DevCAError, match="no path"):
        ca.issue(SpiffeId.parse("spiffe://payroll.example"))


def test_repr_has_no_key_material(ca: DevCA) -> None:
    issued = ca.issue(AGENT)
    text = repr(issued) + str(issued) + repr(ca) + str(ca)
    assert "PRIVATE" not in text
    body = b"".join(issued.key_pem.splitlines()[1:-1]).decode()
    assert body[:24] not in text
    assert str(AGENT) in repr(issued)
    assert isinstance(issued, IssuedSvid)


# -- write_svid_files ------------------------------------------------------------


def test_write_svid_files(ca: DevCA, tmp_path: Path) -> None:
    issued = ca.issue(AGENT)
    out = tmp_path / "out"
    paths = write_svid_files(out, issued)
    assert paths == {
        "svid": out / "svid.pem",
        "svid_key": out / "svid_key.pem",
        "bundle": out / "bundle.pem",
    }
    assert _mode(out) == 0o700
    assert _mode(paths["svid_key"]) == 0o600
    assert _mode(paths["bundle"]) == 0o644
    assert paths["svid"].read_bytes() == issued.cert_pem
    assert paths["svid_key"].read_bytes() == issued.key_pem
    assert paths["bundle"].read_bytes() == issued.bundle_pem
    # No temporary files left behind.
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "svid.pem", "svid_key.pem"]
    svid = load_x509_svid(paths["svid"].read_bytes(), paths["svid_key"].read_bytes())
    assert svid.spiffe_id == AGENT


def test_write_svid_files_replaces_existing(ca: DevCA, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = ca.issue(AGENT)
    write_svid_files(out, first)
    inode = os.stat(out / "svid_key.pem").st_ino
    second = ca.issue(AGENT)
    write_svid_files(out, second)
    assert (out / "svid_key.pem").read_bytes() == second.key_pem
    # Replaced by rename, not rewritten in place (a reader holding the old
    # file keeps a complete copy).
    assert os.stat(out / "svid_key.pem").st_ino != inode
    assert _mode(out / "svid_key.pem") == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "svid.pem", "svid_key.pem"]


def test_write_svid_files_into_a_file_fails_cleanly(ca: DevCA, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DevCAError, match="not a directory"):
        write_svid_files(blocker, ca.issue(AGENT))


# -- write_atomic ------------------------------------------------------------------


def test_write_atomic_sets_exact_mode_despite_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "public", b"data", 0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "public") == 0o644


def test_write_atomic_failure_leaves_no_temp_and_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    # A non-empty directory cannot be renamed over: os.replace fails.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inner").write_text("x")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "d", b"new", 0o600)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]
