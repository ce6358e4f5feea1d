"""A TLS scan of the inbound listener with sslyze (issue 12, "Keep it found").

Theory of operation: sslyze pins an older ``cryptography`` than the project's,
so it lives in its own tool venv (``make sslyze``, which ``make test`` runs)
and is driven as a command. One sslyze run scans two in-process inbound
listeners, the default (TLS 1.3 only) and one configured with
``min_tls = "1.2"``, presenting a valid SVID so every handshake completes
(the listener requires a client certificate). ``findings`` reads the JSON
report and names everything a scanner would flag. The certificate-path
findings SPIFFE implies are expected, not failures: no DNS name to match,
a private CA no public store trusts, no OCSP or CT for short-lived SVIDs.
Every other finding fails the test, and so does a plugin that did not
complete (a scan that errored cannot pass).

``tests/integration/test_tls_scan.py`` covers the same ground with
``openssl s_client``; the two scanners keep each other honest.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.tls_support import MemoryAudit, start_echo, start_listener
from tests.pki import TestCA

pytestmark = pytest.mark.interop

SSLYZE = Path(__file__).resolve().parents[2] / ".venv" / "tools" / "sslyze" / "bin" / "sslyze"
SCANNER_ID = "spiffe://a.org/agent/scanner"
PLUGINS = (
    "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
    "--compression", "--reneg", "--heartbleed", "--robot", "--openssl_ccs",
    "--fallback", "--early_data", "--ems", "--certinfo",
)  # fmt: skip
_LEGACY = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")
# What the certificate plugin reports for any SPIFFE SVID: the name is a URI
# SAN, never a DNS name, so name matching fails (the path itself must verify).
_NAME_MISMATCH = "leaf certificate has no matching subjectAltName"


@pytest.fixture(scope="module")
def sslyze() -> Path:
    """The tool venv's sslyze, or skip; under CI=true a missing one fails.
    (A sync fixture, so the skip reason is not lost in trio's exception group.)"""
    if not os.access(SSLYZE, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SSLYZE} is required for this interop test (CI=true); run `make sslyze`")
        pytest.skip("sslyze tool venv missing; run `make sslyze`")
    return SSLYZE


def _forward_secret_aead(suite: dict[str, Any]) -> bool:
    name = str(suite["cipher_suite"]["name"])
    return name.startswith("TLS_ECDHE_") and ("_GCM_" in name or "_CHACHA20_POLY1305_" in name)


def findings(server: dict[str, Any], *, tls12: bool) -> list[str]:
    """Everything wrong in one server's sslyze result, bar what SPIFFE implies."""
    where = f"{server['server_location']['port']}"
    if server["connectivity_status"] != "COMPLETED" or server["scan_status"] != "COMPLETED":
        return [f"{where}: scan did not complete: {server.get('connectivity_error_trace')}"]
    found: list[str] = []
    results: dict[str, Any] = {}
    for plugin, attempt in server["scan_result"].items():
        if attempt["status"] == "NOT_SCHEDULED":
            continue
        if attempt["status"] != "COMPLETED":
            found.append(f"{where}: {plugin} {attempt['status']}: {attempt['error_reason']}")
        else:
            results[plugin] = attempt["result"]

    def need(plugin: str) -> dict[str, Any] | None:
        if plugin not in results:
            found.append(f"{where}: no {plugin} result")
        return results.get(plugin)

    for version in _LEGACY:
        if (legacy := need(f"{version}_cipher_suites")) and legacy["accepted_cipher_suites"]:
            found.append(f"{where}: {version} accepted")
    if tls12_result := need("tls_1_2_cipher_suites"):
        accepted = tls12_result["accepted_cipher_suites"]
        if not tls12 and accepted:
            found.append(f"{where}: TLS 1.2 accepted though not configured")
        if tls12 and not accepted:
            found.append(f"{where}: TLS 1.2 configured but refused")
        weak = [s["cipher_suite"]["name"] for s in accepted if not _forward_secret_aead(s)]
        if weak:
            found.append(f"{where}: TLS 1.2 suites without ECDHE + AEAD: {weak}")
    if (tls13 := need("tls_1_3_cipher_suites")) and not tls13["accepted_cipher_suites"]:
        found.append(f"{where}: TLS 1.3 refused")
    for result in (r for r in (tls12_result, tls13) if r):
        for suite in result["accepted_cipher_suites"]:
            key = suite.get("ephemeral_key") or {}
            if key.get("type_name") != "ECDH" or int(key.get("size", 0)) < 253:
                kex = (key.get("type_name"), key.get("size"))
                found.append(f"{where}: weak key exchange {kex} in {suite['cipher_suite']['name']}")

    checks = [
        ("tls_compression", "supports_compression", False),
        ("tls_1_3_early_data", "supports_early_data", False),
        ("openssl_ccs_injection", "is_vulnerable_to_ccs_injection", False),
        ("heartbleed", "is_vulnerable_to_heartbleed", False),
        ("session_renegotiation", "supports_secure_renegotiation", True),
        ("session_renegotiation", "is_vulnerable_to_client_renegotiation_dos", False),
        ("session_renegotiation", "client_renegotiations_success_count", 0),
        ("tls_fallback_scsv", "supports_fallback_scsv", True),
        ("robot", "robot_result", "NOT_VULNERABLE_RSA_NOT_SUPPORTED"),
    ]
    if tls12:  # EMS is a TLS 1.2 extension; TLS 1.3 has it built in
        checks.append(("tls_extended_master_secret", "supports_ems_extension", True))
    for plugin, field, wanted in checks:
        if (got := need(plugin)) is not None and got.get(field) != wanted:
            found.append(f"{where}: {plugin}.{field} = {got.get(field)!r}, want {wanted!r}")

    if certinfo := need("certificate_info"):
        found += [f"{where}: {f}" for f in _certificate_findings(certinfo)]
    return found


def _certificate_findings(certinfo: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for deployment in certinfo["certificate_deployments"]:
        if not deployment["received_chain_has_valid_order"]:
            found.append("served chain out of order")
        for cert in deployment["received_certificate_chain"]:
            digest = cert["signature_hash_algorithm"]
            if digest is None or digest["name"] in ("md5", "sha1"):
                found.append(f"weak signature {digest} on {cert['subject']['rfc4514_string']}")
        for path in deployment["path_validation_results"]:
            # The public stores cannot trust a private SPIFFE CA; the bundle
            # we supplied must verify the path, so only the name may fail.
            supplied = path["trust_store"]["name"] == "Supplied CA file"
            if supplied and _NAME_MISMATCH not in str(path["validation_error"]):
                found.append(f"path to the trust bundle: {path['validation_error']}")
    return found


async def test_sslyze_scan_of_the_inbound_listener(ca_a: TestCA, sslyze: Path) -> None:
    work = Path(tempfile.mkdtemp())
    cert, key = ca_a.issue(SCANNER_ID).write(work)
    bundle = work / "bundle.pem"
    bundle.write_bytes(ca_a.bundle_pem())
    report = work / "sslyze.json"
    audits = {"1.3": MemoryAudit(), "1.2": MemoryAudit()}
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        ports: dict[str, int] = {}
        for min_tls, audit in audits.items():
            _, ports[min_tls] = await start_listener(
                nursery,
                nursery,
                direction="inbound",
                issued=ca_a.issue("spiffe://a.org/svc/hr"),
                cas=(ca_a,),
                patterns=[SCANNER_ID],
                target=("127.0.0.1", echo_port),
                audit=audit,
                min_tls=min_tls,
            )
        command = [
            str(sslyze), "--quiet", "--mozilla_config=disable", f"--json_out={report}",
            "--cert", str(cert), "--key", str(key), "--certinfo_ca_file", str(bundle),
            *PLUGINS, *(f"127.0.0.1:{port}" for port in ports.values()),
        ]  # fmt: skip
        with trio.fail_after(120):
            done = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    scan = json.loads(report.read_text())
    assert not scan["invalid_server_strings"]
    by_port = {r["server_location"]["port"]: r for r in scan["server_scan_results"]}
    assert sorted(by_port) == sorted(ports.values())
    problems = findings(by_port[ports["1.3"]], tls12=False)
    problems += findings(by_port[ports["1.2"]], tls12=True)
    assert not problems, "\n".join(problems)

    # The scan was of real mTLS sessions (the scanner's SVID was accepted),
    # and the old protocols were refused by our listener, not by the scanner.
    for min_tls, audit in audits.items():
        records = audit.records()
        opened = [r for r in records if r["event"] == "connection.open"]
        assert opened and all(r["peer_id"] == SCANNER_ID for r in opened), min_tls
        refused = {r["reason"] for r in records if r["event"] == "connection.refused"}
        assert "tls_version_refused" in refused, (min_tls, refused)
