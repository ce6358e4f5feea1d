"""The benchmark report says which key exchange our sidecars negotiate: the
C peers run on the system OpenSSL, ours on the cryptography wheel's, and a
post-quantum hybrid costs CPU and memory the ratios would otherwise hide."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL

from benchmarks.document import key_exchange
from benchmarks.fixtures import Identity
from tests.pki import TestCA


def _identity(ca: TestCA, name: str, root: Path) -> Identity:
    spiffe_id = f"spiffe://{ca.trust_domain}/{name}"
    cert, key = ca.issue(spiffe_id).write(root / name, bundle=ca.bundle_pem())
    return Identity(spiffe_id, cert, key, root / name / "bundle.pem", cert, "")


def test_the_group_named_is_the_one_our_openssl_negotiates(ca_a: TestCA, tmp_path: Path) -> None:
    server, client = _identity(ca_a, "server", tmp_path), _identity(ca_a, "client", tmp_path)
    group = key_exchange(server, client)
    # What a default pyOpenSSL client offers first is what two of our
    # endpoints agree on: X25519MLKEM768 with OpenSSL 3.5 and later.
    assert group in ("X25519MLKEM768", "X25519"), group
    if SSL.OPENSSL_VERSION_NUMBER >= 0x30500000:
        assert group == "X25519MLKEM768"


def test_a_handshake_that_cannot_complete_names_no_group(ca_a: TestCA, tmp_path: Path) -> None:
    server = _identity(ca_a, "server", tmp_path)
    stranger = _identity(TestCA.create("elsewhere.test"), "client", tmp_path / "other")
    assert key_exchange(server, stranger).startswith("unknown")
