"""Black-box: the real ``agent-proxy inbound``/``outbound`` processes, driven by
real clients (Python's ssl, openssl s_client, curl) and real servers (nginx)."""

from __future__ import annotations

import datetime as dt
import http.server
import os
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli import main
from tests import support
from tests.pki import TestCA
from tests.support import ProxyProcess

PAYROLL = "spiffe://a.org/agent/payroll"
HR = "spiffe://a.org/svc/hr"


@pytest.fixture
def ids(tmp_path: Path, ca_a: TestCA) -> dict[str, dict[str, str]]:
    out = {}
    for name, spiffe_id in (
        ("hr", HR),
        ("payroll", PAYROLL),
        ("marketing", "spiffe://a.org/agent/marketing"),
    ):
        issued = ca_a.issue(spiffe_id, dns_names=["localhost"])
        out[name] = support.write_identity(tmp_path / name, issued, ca_a.bundle_pem())
    return out


def _inbound(ident: dict[str, str], target: tuple[str, int], *extra: str) -> ProxyProcess:
    proc = ProxyProcess(
        [
            "inbound",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"{target[0]}:{target[1]}",
            "--cert",
            ident["cert"],
            "--key",
            ident["key"],
            "--bundle",
            ident["bundle"],
            "--allow",
            PAYROLL,
            *extra,
        ]
    )
    proc.wait_listening()
    return proc


def _outbound(
    ident: dict[str, str], target: tuple[str, int], expect: str, *extra: str
) -> ProxyProcess:
    proc = ProxyProcess(
        [
            "outbound",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"{target[0]}:{target[1]}",
            "--cert",
            ident["cert"],
            "--key",
            ident["key"],
            "--bundle",
            ident["bundle"],
            "--expect",
            expect,
            *extra,
        ]
    )
    proc.wait_listening()
    return proc


def _ssl_client(ident: dict[str, str] | None, **kw: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SVIDs name workloads, not hosts; the CA is still checked
    ctx.verify_mode = ssl.CERT_NONE
    if ident:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ident["bundle"])
        ctx.load_cert_chain(ident["cert"], ident["key"])
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def _roundtrip(addr: tuple[str, int], ctx: ssl.SSLContext, payload: bytes) -> bytes:
    with socket.create_connection(addr, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from backend; path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_backend() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ("127.0.0.1", int(server.server_address[1]))
    server.shutdown()
    server.server_close()


# -- clients -----------------------------------------------------------------


def test_python_ssl_client(ids, echo) -> None:  # type: ignore[no-untyped-def]
    proc = _inbound(ids["hr"], echo)
    try:
        assert (
            _roundtrip(proc.address, _ssl_client(ids["payroll"]), b"ping" * 1000) == b"ping" * 1000
        )
        opened = proc.audit.wait_json(event="connection.open")
        assert opened["peer_id"] == PAYROLL and opened["decision"] == "allow"
        closed = proc.audit.wait_json(event="connection.close")
        assert closed["bytes_up"] == 4000 and closed["bytes_down"] == 4000, str(closed)
    finally:
        assert proc.stop() == 0


def test_openssl_s_client(ids, http_backend) -> None:  # type: ignore[no-untyped-def]
    openssl = support.require_binary("openssl")
    proc = _inbound(ids["hr"], http_backend)
    try:
        host, port = proc.address
        out = subprocess.run(
            [
                openssl,
                "s_client",
                "-connect",
                f"{host}:{port}",
                "-quiet",
                "-cert",
                ids["payroll"]["cert"],
                "-key",
                ids["payroll"]["key"],
                "-CAfile",
                ids["payroll"]["bundle"],
                "-verify_return_error",
            ],
            input=b"GET /s_client HTTP/1.0\r\n\r\n",
            capture_output=True,
            timeout=20,
        )
        assert b"hello from backend; path=/s_client" in out.stdout, out.stderr
        assert proc.audit.wait_json(event="connection.open")["peer_id"] == PAYROLL
    finally:
        proc.stop()


def test_curl_with_client_cert(ids, http_backend) -> None:  # type: ignore[no-untyped-def]
    curl = support.require_binary("curl")
    proc = _inbound(ids["hr"], http_backend)
    try:
        _, port = proc.address
        out = subprocess.run(
            [
                curl,
                "-sS",
                "--fail",
                "--cert",
                ids["payroll"]["cert"],
                "--key",
                ids["payroll"]["key"],
                "--cacert",
                ids["payroll"]["bundle"],
                f"https://localhost:{port}/curl",
            ],
            capture_output=True,
            timeout=20,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert "path=/curl" in out.stdout
        # A client the allowlist does not name is refused inside the handshake.
        denied = subprocess.run(
            [
                curl,
                "-sS",
                "--cert",
                ids["marketing"]["cert"],
                "--key",
                ids["marketing"]["key"],
                "--cacert",
                ids["marketing"]["bundle"],
                f"https://localhost:{port}/curl",
            ],
            capture_output=True,
            timeout=20,
            text=True,
        )
        assert denied.returncode != 0
        assert "path=/curl" not in denied.stdout
        refused = proc.audit.wait_json(event="connection.refused")
        assert refused["reason"] == "peer_not_allowed"
        assert refused["peer_id"] == "spiffe://a.org/agent/marketing"
    finally:
        proc.stop()


# -- nginx as the outbound upstream -------------------------------------------

_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        ssl_protocols TLSv1.3;
        location / {{
            return 200 "nginx says hi to $ssl_client_s_dn_legacy verify=$ssl_client_verify\\n";
        }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path: Path, ids) -> Iterator[tuple[str, int]]:  # type: ignore[no-untyped-def]
    binary = support.require_binary("nginx")
    port = support.free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            dir=tmp_path,
            port=port,
            cert=ids["hr"]["cert"],
            key=ids["hr"]["key"],
            bundle=ids["hr"]["bundle"],
        )
    )
    extra = ["-g", "user root;"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [binary, "-p", str(tmp_path), "-c", str(conf), *extra], stderr=subprocess.PIPE
    )
    try:
        support.wait_for_port("127.0.0.1", port)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _http_get(addr: tuple[str, int], path: str = "/") -> bytes:
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: hr\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # a refused upstream closes the agent's socket with data unread
        return b"".join(chunks)


def test_outbound_to_nginx_with_verify_client(ids, nginx) -> None:  # type: ignore[no-untyped-def]
    proc = _outbound(ids["payroll"], nginx, HR)
    try:
        response = _http_get(proc.address)
        assert b"200 OK" in response and b"verify=SUCCESS" in response
        opened = proc.audit.wait_json(event="connection.open")
        assert opened["peer_id"] == HR and opened["direction"] == "outbound"
    finally:
        proc.stop()
    wrong = _outbound(ids["payroll"], nginx, "spiffe://a.org/svc/bank")
    try:
        assert _http_get(wrong.address) == b""
        refused = wrong.audit.wait_json(event="connection.refused")
        assert refused["reason"] == "peer_not_allowed" and refused["peer_id"] == HR
    finally:
        wrong.stop()


# -- the whole pair ---------------------------------------------------------


def test_pair_end_to_end_with_curl(ids, http_backend) -> None:  # type: ignore[no-untyped-def]
    curl = support.require_binary("curl")
    inbound = _inbound(ids["hr"], http_backend)
    outbound = _outbound(ids["payroll"], inbound.address, HR)
    try:
        _, port = outbound.address
        out = subprocess.run(
            [curl, "-sS", "--fail", f"http://127.0.0.1:{port}/timesheets"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert "path=/timesheets" in out.stdout, out.stderr
        assert inbound.audit.wait_json(event="connection.close")["peer_id"] == PAYROLL
        assert outbound.audit.wait_json(event="connection.close")["peer_id"] == HR
    finally:
        outbound.stop()
        inbound.stop()


# -- bad input from the network ----------------------------------------------


def test_network_garbage_never_kills_the_process(ids, echo) -> None:  # type: ignore[no-untyped-def]
    proc = _inbound(ids["hr"], echo, "--handshake-timeout", "0.5")
    try:
        addr = proc.address
        with socket.create_connection(addr) as s:  # garbage
            s.sendall(os.urandom(2048))
            s.settimeout(10)
            while s.recv(4096):
                pass
        proc.audit.wait_json(event="connection.refused", reason="tls_error")
        with socket.create_connection(addr) as s:  # silent client
            s.settimeout(10)
            assert s.recv(1) == b""
        proc.audit.wait_json(event="connection.refused", reason="handshake_timeout")
        with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.2 only
            _roundtrip(
                addr, _ssl_client(ids["payroll"], maximum_version=ssl.TLSVersion.TLSv1_2), b"x"
            )
        proc.audit.wait_json(event="connection.refused", reason="tls_version_refused")
        with pytest.raises((ssl.SSLError, ConnectionError)):  # no client certificate
            assert _roundtrip(addr, _ssl_client(None), b"x") == b""
            raise ConnectionError("closed")
        proc.audit.wait_json(event="connection.refused", reason="no_peer_certificate")
        assert _roundtrip(addr, _ssl_client(ids["payroll"]), b"still here") == b"still here"
        assert proc.proc.poll() is None
    finally:
        assert proc.stop() == 0


def test_min_tls_12_opt_down(ids, echo) -> None:  # type: ignore[no-untyped-def]
    proc = _inbound(ids["hr"], echo, "--min-tls", "1.2")
    try:
        ctx = _ssl_client(ids["payroll"], maximum_version=ssl.TLSVersion.TLSv1_2)
        assert _roundtrip(proc.address, ctx, b"twelve") == b"twelve"
    finally:
        proc.stop()


def test_sigterm_drains_open_connections(ids, echo) -> None:  # type: ignore[no-untyped-def]
    proc = _inbound(ids["hr"], echo, "--drain-timeout", "30")
    ctx = _ssl_client(ids["payroll"])
    with socket.create_connection(proc.address, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"before")
        assert tls.recv(100) == b"before"
        proc.audit.wait_json(event="connection.open")
        proc.proc.send_signal(signal.SIGTERM)
        proc.logs.wait_json(event="listeners closed")
        # No new connections once draining...
        support_refused = False
        try:
            with socket.create_connection(proc.address, timeout=2):
                pass
        except OSError:
            support_refused = True
        assert support_refused
        # ...but the open one keeps working until it ends.
        tls.sendall(b"during drain")
        assert tls.recv(100) == b"during drain"
        assert proc.proc.poll() is None
    assert proc.proc.wait(timeout=15) == 0
    closed = proc.audit.wait_json(event="connection.close")
    assert closed["bytes_up"] == len(b"beforeduring drain")


def test_flags_from_environment(ids, echo) -> None:  # type: ignore[no-untyped-def]
    env = {
        "AGENT_PROXY_LISTEN": "127.0.0.1:0",
        "AGENT_PROXY_TARGET": f"{echo[0]}:{echo[1]}",
        "AGENT_PROXY_CERT": ids["hr"]["cert"],
        "AGENT_PROXY_KEY": ids["hr"]["key"],
        "AGENT_PROXY_BUNDLE": ids["hr"]["bundle"],
        "AGENT_PROXY_ALLOW": f"spiffe://a.org/agent/nobody,{PAYROLL}",
    }
    proc = ProxyProcess(["inbound"], env=env)
    proc.wait_listening()
    try:
        assert _roundtrip(proc.address, _ssl_client(ids["payroll"]), b"env") == b"env"
    finally:
        proc.stop()


# -- bad configuration: one line, exit 2 ------------------------------------


def _run_bad(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*support.agent_proxy_cmd(), *args], capture_output=True, text=True, timeout=30
    )


def _run_bad_in_process(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> subprocess.CompletedProcess[str]:
    """The CLI entry point in-process, as ``python -m proxy`` runs it: the
    checks below all happen before a socket is opened."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_cert", "No such file"),
        ("key_mismatch", "does not match"),
        ("expired_own", "expired"),
        ("bad_pattern", "--allow"),
        ("wildcard_middle", "--allow"),
        ("remote_target", "loopback"),
        ("bad_min_tls", "--min-tls"),
        ("bad_listen", "--listen"),
        ("bad_federate", "--federate"),
        ("missing_allow", "--allow"),
        ("wrong_bundle", "does not verify"),
        ("unknown_flag", "unrecognized"),
    ],
)
def test_bad_configuration(  # type: ignore[no-untyped-def]
    tmp_path: Path, ca_a: TestCA, ids, case: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    hr = ids["hr"]
    base = {
        "--listen": "127.0.0.1:0",
        "--target": "127.0.0.1:8080",
        "--cert": hr["cert"],
        "--key": hr["key"],
        "--bundle": hr["bundle"],
        "--allow": PAYROLL,
    }
    extra: list[str] = []
    if case == "missing_cert":
        base["--cert"] = str(tmp_path / "nope.pem")
    elif case == "key_mismatch":
        base["--key"] = ids["payroll"]["key"]
    elif case == "expired_own":
        now = dt.datetime.now(dt.UTC)
        old = ca_a.issue(
            HR, not_before=now - dt.timedelta(hours=3), not_after=now - dt.timedelta(hours=1)
        )
        cert, key = old.write(tmp_path / "old")
        base["--cert"], base["--key"] = str(cert), str(key)
    elif case == "bad_pattern":
        base["--allow"] = "spiffe://A.org/agent"
    elif case == "wildcard_middle":
        base["--allow"] = "spiffe://a.org/*/payroll"
    elif case == "remote_target":
        base["--target"] = "192.0.2.10:8080"
    elif case == "bad_min_tls":
        extra = ["--min-tls", "1.1"]
    elif case == "bad_listen":
        base["--listen"] = "nonsense"
    elif case == "bad_federate":
        extra = ["--federate", "b.org"]
    elif case == "missing_allow":
        del base["--allow"]
    elif case == "wrong_bundle":
        other = tmp_path / "other.pem"
        other.write_bytes(TestCA.create("a.org").bundle_pem())
        base["--bundle"] = str(other)
    elif case == "unknown_flag":
        extra = ["--frobnicate"]
    args = ["inbound", *[x for kv in base.items() for x in kv], *extra]
    result = _run_bad_in_process(args, capsys)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0]
    assert "PRIVATE KEY" not in result.stderr


def test_listen_port_in_use_is_one_line(ids) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hr = ids["hr"]
        result = _run_bad(
            [
                "outbound",
                "--listen",
                f"127.0.0.1:{port}",
                "--target",
                "127.0.0.1:9",
                "--cert",
                hr["cert"],
                "--key",
                hr["key"],
                "--bundle",
                hr["bundle"],
                "--expect",
                PAYROLL,
            ]
        )
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "--listen" in errors[0]
    assert "Traceback" not in result.stderr


def test_private_key_never_logged(ids, echo) -> None:  # type: ignore[no-untyped-def]
    """Invariant 1: run traffic and failures, then look for key material."""
    proc = _inbound(ids["hr"], echo, "--handshake-timeout", "0.5", "--log-level", "debug")
    try:
        _roundtrip(proc.address, _ssl_client(ids["payroll"]), b"k")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _roundtrip(proc.address, _ssl_client(ids["marketing"]), b"k")
            raise ConnectionError("closed")
        proc.audit.wait_json(event="connection.refused")
    finally:
        proc.stop()
    everything = "\n".join(proc.audit.all_lines() + proc.logs.all_lines())
    key_pem = Path(ids["hr"]["key"]).read_text()
    body = "".join(key_pem.strip().splitlines()[1:-1])
    assert "PRIVATE KEY" not in everything
    assert body[:40] not in everything
    assert oct(os.stat(ids["hr"]["key"]).st_mode & 0o777) == "0o600"
