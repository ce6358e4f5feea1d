"""Black-box: the audit trail of ``agent-proxy run``: nothing lost on
``kill -9``, fail closed on a full filesystem (503 ``audit_unavailable``,
``/readyz`` 503) and recovery, a signed trail that ``audit verify`` accepts."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_audit_sink import fill
from tests.pki import Issued, TestCA
from tests.support import DEADLINE, ProxyProcess

PAYROLL = "spiffe://a.org/agent/payroll"
HR = "spiffe://a.org/svc/hr"


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ("127.0.0.1", int(server.server_address[1]))
    server.shutdown()
    server.server_close()


def start_inbound(tmp: Path, ca: TestCA, backend: tuple[str, int], audit: Path) -> ProxyProcess:
    ident = tmp / "hr"
    ca.issue(HR).write(ident, ca.bundle_pem())
    config = tmp / "hr.toml"
    config.write_text(
        f'[identity]\nsource = "files"\ncert = "{ident}/svid.pem"\nkey = "{ident}/svid_key.pem"\n'
        f'bundle = "{ident}/bundle.pem"\n[admin]\nlisten = "127.0.0.1:0"\n'
        f'[audit]\npath = "{audit}"\n'
        f"""
[[inbound]]
name = "hr-api"
listen = "127.0.0.1:0"
target = "{backend[0]}:{backend[1]}"
protocol = "http"
[[inbound.rules]]
name = "payroll-reads-timesheets"
peers = ["{PAYROLL}"]
methods = ["GET"]
paths = ["/timesheets/**"]
"""
    )
    return ProxyProcess(["run", "--config", str(config)])


def client_context(tmp: Path, ca: TestCA) -> ssl.SSLContext:
    client: Issued = ca.issue(PAYROLL)
    cert, key = client.write(tmp / "payroll", ca.bundle_pem())
    ctx = ssl.create_default_context(cafile=str(tmp / "payroll" / "bundle.pem"))
    ctx.check_hostname = False  # SVIDs name a SPIFFE ID, not a host
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def connect(addr: tuple[str, int], ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(addr[0], addr[1], context=ctx, timeout=DEADLINE)


def requests_in(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_bytes().splitlines():
        record = json.loads(line)
        if record["event"] == "http.request":
            out.append(record)
    return out


@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "connection-per-request"])
def test_kill_9_after_the_100th_response_loses_no_record(
    tmp_path: Path, ca_a: TestCA, backend: tuple[str, int], keep_alive: bool
) -> None:
    audit = tmp_path / "hr-audit.jsonl"
    hr = start_inbound(tmp_path, ca_a, backend, audit)
    try:
        addr = hr.wait_listener("hr-api")
        ctx = client_context(tmp_path, ca_a)
        conn = connect(addr, ctx)
        for i in range(100):
            if not keep_alive:
                conn = connect(addr, ctx)
            conn.request("GET", f"/timesheets/{i}")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"ok")
            if not keep_alive:
                conn.close()
        os.kill(hr.proc.pid, signal.SIGKILL)  # right after the 100th response
        hr.proc.wait(timeout=DEADLINE)
    finally:
        hr.stop()
    paths = [r["path"] for r in requests_in(audit)]
    assert paths == [f"/timesheets/{i}" for i in range(100)]


def _get(url: str) -> tuple[int, bytes]:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    conn.request("GET", "/readyz")
    response = conn.getresponse()
    return response.status, response.read()


def _wait_ready(admin: str, want: int) -> bytes:
    end = time.monotonic() + DEADLINE
    while True:
        status, body = _get(admin)
        if status == want:
            return body
        if time.monotonic() > end:
            raise TimeoutError(f"/readyz stayed {status}: {body!r}")
        threading.Event().wait(0.05)  # the sink retries every second; poll its readiness


def test_full_filesystem_fails_closed_then_recovers(
    tmp_path: Path, ca_a: TestCA, backend: tuple[str, int]
) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("cannot mount a tmpfs (root needed)")
        pytest.skip("cannot mount a tmpfs (root needed)")
    audit = mount / "audit.jsonl"
    hr = start_inbound(tmp_path, ca_a, backend, audit)
    try:
        addr = hr.wait_listener("hr-api")
        admin_host, admin_port = hr.wait_listener("admin")
        admin = f"{admin_host}:{admin_port}"
        ctx = client_context(tmp_path, ca_a)
        _wait_ready(admin, 200)
        conn = connect(addr, ctx)
        conn.request("GET", "/timesheets/before")
        assert conn.getresponse().read() == b"ok"
        conn.close()
        filler = fill(mount)
        # Writes still fit in the file's last page for a while; admitted
        # requests keep their records queued, then new ones are refused.
        asked = []
        for i in range(200):
            conn = connect(addr, ctx)
            asked.append(f"/timesheets/while-full-{i}")
            conn.request("GET", asked[-1])
            response = conn.getresponse()
            body = response.read()
            conn.close()
            if response.status == 503:
                assert json.loads(body)["reason"] == "audit_unavailable"
                break
        else:
            pytest.fail("no 503 while the filesystem was full")
        assert b"audit trail unavailable" in _wait_ready(admin, 503)
        filler.unlink()
        _wait_ready(admin, 200)
        conn = connect(addr, ctx)
        conn.request("GET", "/timesheets/after")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
        conn.close()
        errors = [line for line in hr.logs.all_lines() if "audit sink cannot write" in line]
        assert len(errors) == 1  # one line per incident
    finally:
        hr.stop()
        records = requests_in(audit) if audit.exists() else []
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
    assert [r["path"] for r in records] == ["/timesheets/before", *asked, "/timesheets/after"]
    assert records[-2]["reason"] == "audit_unavailable" and records[-2]["status"] == 503


def test_clean_shutdown_seals_the_trail(
    tmp_path: Path, ca_a: TestCA, backend: tuple[str, int]
) -> None:
    audit = tmp_path / "hr-audit.jsonl"
    hr = start_inbound(tmp_path, ca_a, backend, audit)
    try:
        addr = hr.wait_listener("hr-api")
        conn = connect(addr, client_context(tmp_path, ca_a))
        for i in range(3):
            conn.request("GET", f"/timesheets/{i}")
            conn.getresponse().read()
        conn.close()
    finally:
        assert hr.stop() == 0
    bundle = tmp_path / "hr" / "bundle.pem"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "audit",
            "verify",
            str(audit),
            "--bundle",
            f"a.org={bundle}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("intact: ") and f"signed by {HR}" in done.stdout
