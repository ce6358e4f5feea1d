"""Rotation under load: a client loop runs through an outbound and inbound
pair while both sides' SVID files are reissued every second for 10 seconds.
No request may fail, and later connections present the new serials."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from tests.pki import Issued, TestCA
from tests.support import ProxyProcess

HR = "spiffe://a.org/svc/hr"
PAYROLL = "spiffe://a.org/agent/payroll"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _reissue(ca: TestCA, spiffe_id: str, directory: Path) -> Issued:
    issued = ca.issue(spiffe_id)
    # Key first, then certificate, as separate renames: for a moment the
    # pair does not match, and the sidecar must never load that mix.
    _write_atomic(directory / "svid_key.pem", issued.key_pem(), 0o600)
    _write_atomic(directory / "svid.pem", issued.cert_pem(), 0o644)
    return issued


def _config(directory: Path, body: str) -> str:
    return (
        f'[identity]\nsource = "files"\ncert = "{directory}/svid.pem"\n'
        f'key = "{directory}/svid_key.pem"\nbundle = "{directory}/bundle.pem"\n'
        f'[admin]\nlisten = "127.0.0.1:0"\n' + body
    )


class ClientLoop:
    """Round trips through ``port`` in a thread until stopped; every result kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.results: list[bool] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            payload = f"request {n}".encode()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := s.recv(4096):
                        got += chunk
                self.results.append(got == payload)
                if got != payload:
                    self.errors.append(f"request {n}: got {got!r}")
            except OSError as exc:
                self.results.append(False)
                self.errors.append(f"request {n}: {exc}")

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def reissue_every_second(ca: TestCA, pairs: dict[str, tuple[str, Path]]) -> dict[str, Issued]:
    """Ten rotations, one a second, of every (SPIFFE ID, directory); the last issued."""
    final: dict[str, Issued] = {}
    tick = threading.Event()
    for _ in range(10):
        tick.wait(1.0)  # the rotation cadence under test, not a wait for a condition
        for name, (spiffe_id, directory) in pairs.items():
            final[name] = _reissue(ca, spiffe_id, directory)
    return final


def serial(issued: Issued) -> str:
    return format(issued.cert.serial_number, "x")


def test_rotation_under_load(tmp_path: Path, ca_a: TestCA, echo: tuple[str, int]) -> None:
    hr_dir, payroll_dir = tmp_path / "hr", tmp_path / "payroll"
    ca_a.issue(HR).write(hr_dir, ca_a.bundle_pem())
    ca_a.issue(PAYROLL).write(payroll_dir, ca_a.bundle_pem())
    (tmp_path / "hr.toml").write_text(
        _config(
            hr_dir,
            f"""
[[inbound]]
name = "hr"
listen = "127.0.0.1:0"
target = "{echo[0]}:{echo[1]}"
protocol = "tcp"
[[inbound.rules]]
peers = ["{PAYROLL}"]
""",
        )
    )
    hr = ProxyProcess(["run", "--config", str(tmp_path / "hr.toml")])
    _, hr_port = hr.wait_listener("hr")
    (tmp_path / "payroll.toml").write_text(
        _config(
            payroll_dir,
            f"""
[[outbound]]
name = "to-hr"
listen = "127.0.0.1:0"
protocol = "tcp"
[[outbound.routes]]
target = "127.0.0.1:{hr_port}"
expect = ["{HR}"]
""",
        )
    )
    payroll = ProxyProcess(["run", "--config", str(tmp_path / "payroll.toml")])
    _, out_port = payroll.wait_listener("to-hr")

    loop = ClientLoop(out_port)
    try:
        final = reissue_every_second(ca_a, {"hr": (HR, hr_dir), "payroll": (PAYROLL, payroll_dir)})
        # Later connections present the new serials: wait for them to show up.
        payroll.audit.wait_json(
            event="connection.open", peer_cert_serial=serial(final["hr"]), deadline=30
        )
        hr.audit.wait_json(
            event="connection.open", peer_cert_serial=serial(final["payroll"]), deadline=30
        )
    finally:
        loop.finish()
        payroll.stop()
        hr.stop()
    assert len(loop.results) > 20, "the client loop barely ran"
    assert all(loop.results), loop.errors[:5]
    rotations = [
        ln for ln in hr.logs.all_lines() + payroll.logs.all_lines() if "identity rotated" in ln
    ]
    assert rotations, "no rotation was logged"
