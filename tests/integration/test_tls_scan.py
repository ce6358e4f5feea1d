"""A TLS scan of the inbound listener with ``openssl s_client`` as the
scanner (issue 12, "Keep it found").

sslyze pins ``cryptography<47`` and this project runs a newer one, so it
cannot share the test environment; it runs from a tool venv in
``test_tls_sslyze.py``. This matrix covers what its scan reports for a server
like ours, with a second scanner (OpenSSL's): protocol versions
(nothing below TLS 1.2; TLS 1.2 only when configured), every TLS 1.2 cipher
and TLS 1.3 suite the scanner's OpenSSL knows (only ECDHE + AEAD accepted,
which also rules out ROBOT: no RSA key exchange), no compression, RFC 5746
secure renegotiation and no client-initiated renegotiation, TLS_FALLBACK_SCSV
honoured, no session resumption and no heartbeat extension (so no
Heartbleed). Findings SPIFFE implies are
expected, not failures: no DNS name, a private CA, a client certificate
required (the scanner presents a valid SVID so the handshakes can finish).

Every refusal must come from our server (an alert in the output), so a
scanner that refuses to offer something itself cannot pass a check.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from tests.integration.tls_support import MemoryAudit, start_echo, start_listener
from tests.pki import TestCA
from tests.support import require_binary

pytestmark = pytest.mark.interop

_AEAD_ECDHE = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
_TLS13_SUITES = {
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
}
_TLS13_ACCEPTABLE = {
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
}


class Scanner:
    def __init__(self, openssl: str, cert: Path, key: Path) -> None:
        self.openssl = openssl
        self.cert = cert
        self.key = key
        self.limit = trio.CapacityLimiter(4)

    async def probe(self, port: int, *args: str) -> str:
        """One s_client handshake (stdin closed: it ends right after)."""
        command = [
            self.openssl, "s_client", "-connect", f"127.0.0.1:{port}",
            "-cert", str(self.cert), "-key", str(self.key), *args,
        ]  # fmt: skip
        async with self.limit:
            with trio.fail_after(20):
                done = await trio.run_process(
                    command, stdin=b"", capture_stdout=True, capture_stderr=True, check=False
                )
        return (done.stdout + done.stderr).decode(errors="replace")

    async def renegotiate(self, port: int) -> str:
        """Ask for a client-initiated renegotiation (s_client's ``R`` command,
        after one echo). Returns s_client's output once it has ended."""
        command = [
            self.openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-msg",
            "-cert", str(self.cert), "-key", str(self.key),
        ]  # fmt: skip
        proc = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdin is not None and proc.stdout is not None
        output = b""
        try:
            with trio.fail_after(20):
                await proc.stdin.send_all(b"ping\n")
                while b"\nping" not in output:
                    output += await proc.stdout.receive_some()
                # A separate write: s_client takes R as a command only at
                # the start of what one read from stdin returns.
                await proc.stdin.send_all(b"R\n")
                while chunk := await proc.stdout.receive_some():
                    output += chunk
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return output.decode(errors="replace")

    async def ciphers(self, *spec: str) -> list[str]:
        done = await trio.run_process(
            [self.openssl, "ciphers", *spec], capture_stdout=True, check=True
        )
        return done.stdout.decode().strip().split(":")


def _established(output: str) -> bool:
    return "Cipher is (NONE)" not in output and (
        "\nNew, TLSv1" in output or "\nReused, TLSv1" in output
    )


def _refused_by_server(output: str) -> bool:
    lowered = output.lower()
    return not _established(output) and (
        "alert" in lowered or "no shared cipher" in lowered or "inappropriate fallback" in lowered
    )


async def _scan_each(
    scanner: Scanner, port: int, items: Sequence[str], flag: str, *extra: str
) -> set[str]:
    """Try each cipher (or suite) alone: the set the server accepted. A
    refusal that is not the server's alert fails the scan."""
    accepted: set[str] = set()
    unclear: list[str] = []

    async def one(item: str) -> None:
        output = await scanner.probe(port, *extra, flag, item)
        if _established(output):
            accepted.add(item.split("@")[0])
        elif not _refused_by_server(output) and "no ciphers available" not in output.lower():
            unclear.append(f"{item}: {output[-300:]}")

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(one, item)
    assert not unclear, unclear
    return accepted


@pytest.fixture(scope="module")
def scanner(ca_a: TestCA) -> Scanner:
    openssl = require_binary("openssl")
    cert, key = ca_a.issue("spiffe://a.org/agent/scanner").write(Path(tempfile.mkdtemp()))
    return Scanner(openssl, cert, key)


async def _listeners(nursery: trio.Nursery, ca_a: TestCA) -> tuple[int, int]:
    echo_port = await start_echo(nursery)
    ports = []
    for min_tls in ("1.3", "1.2"):
        _, port = await start_listener(
            nursery,
            nursery,
            direction="inbound",
            issued=ca_a.issue("spiffe://a.org/svc/hr"),
            cas=(ca_a,),
            patterns=["spiffe://a.org/agent/scanner"],
            target=("127.0.0.1", echo_port),
            audit=MemoryAudit(),
            min_tls=min_tls,
        )
        ports.append(port)
    return ports[0], ports[1]


async def test_tls_scan_of_the_inbound_listener(ca_a: TestCA, scanner: Scanner) -> None:
    async with trio.open_nursery() as nursery:
        default, opted_down = await _listeners(nursery, ca_a)
        legacy = ("-cipher", "DEFAULT@SECLEVEL=0")  # make the scanner offer old versions

        # Protocol versions: 1.3 by default, 1.2 only when configured, never below.
        for port, refused, accepted in (
            (default, ("-tls1", "-tls1_1", "-tls1_2"), ("-tls1_3",)),
            (opted_down, ("-tls1", "-tls1_1"), ("-tls1_2", "-tls1_3")),
        ):
            for version in refused:
                output = await scanner.probe(port, version, *legacy)
                assert _refused_by_server(output), (port, version, output)
                assert "protocol version" in output.lower(), (version, output)
            for version in accepted:
                assert _established(await scanner.probe(port, version)), (port, version)

        # The server chooses: AES-128-GCM first, though the scanner (as
        # OpenSSL's default) lists AES-256-GCM first.
        assert (await scanner.ciphers("-tls1_3", "-s"))[0] == "TLS_AES_256_GCM_SHA384"
        for port in (default, opted_down):
            output = await scanner.probe(port, "-tls1_3")
            assert "Cipher is TLS_AES_128_GCM_SHA256" in output, output[-400:]

        # Every TLS 1.2 cipher the scanner knows, one at a time: ECDHE + AEAD only.
        tls12 = await scanner.ciphers("-tls1_2", "-s", "ALL:COMPLEMENTOFALL:@SECLEVEL=0")
        tls12 = [c for c in tls12 if not c.startswith("TLS_")]  # 1.3 suites below
        assert len(tls12) > 30
        got = await _scan_each(
            scanner, opted_down, [f"{c}@SECLEVEL=0" for c in tls12], "-cipher", "-tls1_2"
        )
        assert got == _AEAD_ECDHE
        # Every TLS 1.3 suite: AEAD suites OpenSSL enables by default, no CCM_8.
        for port in (default, opted_down):
            got = await _scan_each(scanner, port, sorted(_TLS13_SUITES), "-ciphersuites", "-tls1_3")
            assert got == _TLS13_ACCEPTABLE

        # One full TLS 1.2 handshake, read like a scanner's report.
        report = await scanner.probe(opted_down, "-tls1_2", "-tlsextdebug", "-reconnect")
        assert "Compression: NONE" in report
        assert "Secure Renegotiation IS supported" in report
        assert "heartbeat" not in report.lower()
        assert "\nReused," not in report  # -reconnect offered the session back
        assert report.count("\nNew, TLSv1.2") >= 2
        # TLS 1.3 resumption (tickets) is refused too.
        report13 = await scanner.probe(default, "-tls1_3", "-reconnect")
        assert "\nReused," not in report13
        assert report13.count("\nNew, TLSv1.3") >= 2
        # Client-initiated renegotiation: refused at once, and the client
        # gives up (it does not hang waiting for a ServerHello).
        output = await scanner.renegotiate(opted_down)
        assert "RENEGOTIATING" in output
        assert "warning no_renegotiation" in output
        # Downgrade protection: a 1.2 hello marked as a fallback is refused.
        output = await scanner.probe(opted_down, "-tls1_2", "-fallback_scsv")
        assert _refused_by_server(output)
        assert "inappropriate fallback" in output.lower()
        nursery.cancel_scope.cancel()
