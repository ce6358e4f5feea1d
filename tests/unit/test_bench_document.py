"""The benchmark report says which key exchange our sidecars negotiate: the
C peers run on the system OpenSSL, ours on the cryptography wheel's, and a
post-quantum hybrid costs CPU and memory the ratios would otherwise hide."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL

from benchmarks.contenders import CONTENDERS
from benchmarks.document import key_exchange, report_stem, write_report
from benchmarks.fixtures import Identities, Identity, make_backend
from benchmarks.harness import Pinning
from benchmarks.session import Run
from benchmarks.workloads import Settings
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


def _run(ca: TestCA, root: Path) -> Run:
    server, client = _identity(ca, "server", root), _identity(ca, "client", root)
    ids = Identities(root, client, server, client, client.cert, server.cert, ())
    backend = make_backend(root, 1, None, 1 << 20)
    return Run(Settings(2.0, 1 << 20, 10), 1, Pinning(None, None), ids, backend, root)


def test_a_quick_run_never_replaces_the_full_runs_report(ca_a: TestCA, tmp_path: Path) -> None:
    """``latest.md`` is the committed result of ``make bench``; a try-out
    with ``make bench-quick`` (one repetition of 2 s cells) goes beside it."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "latest.md").write_text("the full run\n")
    run = _run(ca_a, tmp_path / "work")
    printed = write_report(run, CONTENDERS, "quick", 1.0, [], [], out, ("0", "0"))
    assert (out / "latest.md").read_text() == "the full run\n"
    quick = (out / "quick.md").read_text()
    assert quick.startswith("# agent-mtls-proxy benchmark — quick run")
    assert "`make bench-quick` on" in quick and "## Targets" in quick
    assert "| target |" in printed  # the targets table is printed too
    assert report_stem("full") == "latest"  # one chart per test: matplotlib is slow
