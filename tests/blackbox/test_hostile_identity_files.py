"""Black-box: identity files written by someone else (a federated partner
controls its bundle file) never stop the real process. While it serves, a
malformed bundle keeps the last good identity (logged, counted); at start-up
the same files are one line on stderr and exit status 2 (issue 12 item 18)."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests import support
from tests.pki import TestCA
from tests.support import ProxyProcess

HR = "spiffe://a.org/svc/hr"
PARTNER = "spiffe://b.org/agent/auditor"

# The three inputs the probing found (each killed `run` with exit 1); the
# parsers' unit tests and fuzzers (tests/fuzz) cover the rest.
HOSTILE_BUNDLES = {
    "kty is an array": b'{"keys":[{"use":"x509-svid","kty":[]}]}',
    "nested 5000 deep": b'{"keys":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "x5c not ASCII": '{"keys":[{"use":"x509-svid","kty":"EC","x5c":["é"]}]}'.encode(),
}


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    yield from support.echo_server()


@pytest.fixture
def files(tmp_path: Path, ca_a: TestCA, ca_b: TestCA) -> dict[str, Path]:
    ours = support.write_identity(tmp_path / "hr", ca_a.issue(HR), ca_a.bundle_pem())
    partner_bundle = tmp_path / "b.org.json"
    partner_bundle.write_text(ca_b.bundle_jwks())
    client = tmp_path / "client"
    ca_b.issue(PARTNER).write(client)
    return {
        "cert": Path(ours["cert"]),
        "key": Path(ours["key"]),
        "bundle": Path(ours["bundle"]),
        "federated": partner_bundle,
        "client_cert": client / "svid.pem",
        "client_key": client / "svid_key.pem",
    }


def _config(tmp: Path, files: dict[str, Path], echo: tuple[str, int]) -> Path:
    path = tmp / "sidecar.toml"
    path.write_text(
        f'[identity]\nsource = "files"\ncert = "{files["cert"]}"\nkey = "{files["key"]}"\n'
        f'bundle = "{files["bundle"]}"\n'
        # The SPIFFE ID form of the trust domain works as a key too (item 8).
        f'[identity.federation]\n"spiffe://b.org" = "{files["federated"]}"\n'
        f'[admin]\nlisten = "127.0.0.1:0"\n'
        f'[[inbound]]\nname = "hr"\nlisten = "127.0.0.1:0"\n'
        f'target = "{echo[0]}:{echo[1]}"\nprotocol = "tcp"\n'
        f'[[inbound.rules]]\nname = "partner"\npeers = ["spiffe://b.org/**"]\n'
    )
    return path


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _partner_roundtrip(addr: tuple[str, int], files: dict[str, Path]) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(files["client_cert"], files["client_key"])
    with socket.create_connection(addr, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"still here")
        return tls.recv(100)


def _metric(admin: tuple[str, int], line_start: str) -> str:
    with urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return next(line for line in text.splitlines() if line.startswith(line_start))


def test_malformed_federated_bundle_while_serving(
    tmp_path: Path, files: dict[str, Path], echo: tuple[str, int]
) -> None:
    proc = ProxyProcess(["run", "--config", str(_config(tmp_path, files, echo))])
    try:
        addr = proc.wait_listener("hr")
        admin = proc.wait_listener("admin")
        assert _partner_roundtrip(addr, files) == b"still here"
        for count, (case, data) in enumerate(HOSTILE_BUNDLES.items(), start=1):
            _replace(files["federated"], data)
            failed = proc.logs.wait_json(
                event="identity reload failed; keeping the current identity"
            )
            assert str(files["federated"]) in failed["error"], case
            assert failed["level"] == "error"
            assert proc.proc.poll() is None, case
            # The partner's last good bundle is still the one we trust.
            assert _partner_roundtrip(addr, files) == b"still here", case
            errors = _metric(admin, 'agent_proxy_identity_reloads_total{result="error"}')
            assert errors.endswith(f" {count}.0"), (case, errors)
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in "\n".join(proc.logs.all_lines())


def _run_bad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*support.agent_proxy_cmd(), *args], capture_output=True, text=True, timeout=30
    )


# One case per command (each start-up is a whole process; the parsers' own
# tests and tests/fuzz cover every input): a hostile federated bundle, and an
# SVID that passes every X.509 check but whose RSA-1024 key OpenSSL refuses
# when the TLS context is built.
@pytest.mark.parametrize(
    ("command", "case"),
    [("run", "kty is an array"), ("inbound", "nested 5000 deep"), ("run", "rsa-1024")],
)
def test_bad_identity_files_at_start_up(
    tmp_path: Path,
    files: dict[str, Path],
    echo: tuple[str, int],
    ca_a: TestCA,
    command: str,
    case: str,
) -> None:
    if case == "rsa-1024":
        weak = ca_a.issue(HR, key=rsa.generate_private_key(65537, 1024))  # type: ignore[arg-type]
        weak.write(files["cert"].parent)
        culprit = "ee key too small"
    else:
        files["federated"].write_bytes(HOSTILE_BUNDLES[case])
        culprit = str(files["federated"])
    if command == "run":
        result = _run_bad("run", "--config", str(_config(tmp_path, files, echo)))
    else:
        result = _run_bad(
            "inbound",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"{echo[0]}:{echo[1]}",
            "--cert",
            str(files["cert"]),
            "--key",
            str(files["key"]),
            "--bundle",
            str(files["bundle"]),
            "--federate",
            f"spiffe://b.org={files['federated']}",
            "--allow",
            PARTNER,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # One line says what is wrong; operational JSON log lines ("admin
    # listening", "identity loaded") may precede it.
    lines = [ln for ln in result.stderr.splitlines() if ln and not ln.startswith("{")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agent-proxy: error: ") and culprit in lines[0]
