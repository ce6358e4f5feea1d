"""Black-box: ``agent-proxy run`` with HTTP listeners, driven by stock HTTP
clients (curl, requests, httpx) through the egress proxy, with nginx as an
upstream behind an inbound listener."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from tests import support
from tests.pki import TestCA
from tests.support import ProxyProcess

PAYROLL = "spiffe://a.org/agent/payroll"
HR = "spiffe://a.org/svc/hr"


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body_in = self.rfile.read(length) if length else b""
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "body_len": len(body_in),
                "xfcc": self.headers.get_all("x-forwarded-client-cert") or [],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _reply

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ("127.0.0.1", int(server.server_address[1]))
    server.shutdown()
    server.server_close()


def _identity(tmp: Path, ca: TestCA, name: str, spiffe_id: str) -> str:
    d = tmp / name
    ca.issue(spiffe_id).write(d, ca.bundle_pem())
    return (
        f'[identity]\nsource = "files"\ncert = "{d}/svid.pem"\nkey = "{d}/svid_key.pem"\n'
        f'bundle = "{d}/bundle.pem"\n[admin]\nlisten = "127.0.0.1:0"\n'
    )


def _start(tmp: Path, name: str, text: str) -> ProxyProcess:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return ProxyProcess(["run", "--config", str(path)])


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, ca_a: TestCA, backend: tuple[str, int]
) -> Iterator[dict[str, Any]]:
    """One sidecar pair for the module: each test waits for its own records
    (audit waits consume lines, so a record is never matched twice)."""
    tmp_path = tmp_path_factory.mktemp("pair")
    hr = _start(
        tmp_path,
        "hr",
        _identity(tmp_path, ca_a, "hr", HR)
        + f"""
[[inbound]]
name = "hr-api"
listen = "127.0.0.1:0"
target = "{backend[0]}:{backend[1]}"
protocol = "http"
[[inbound.rules]]
name = "payroll-reads-timesheets"
peers = ["{PAYROLL}"]
methods = ["GET", "POST"]
paths = ["/timesheets/**"]
""",
    )
    hr_addr = hr.wait_listener("hr-api")
    payroll = _start(
        tmp_path,
        "payroll",
        _identity(tmp_path, ca_a, "payroll", PAYROLL)
        + f"""
[[outbound]]
name = "egress"
listen = "127.0.0.1:0"
protocol = "http-proxy"
[[outbound.routes]]
name = "hr"
host = "hr-api"
target = "127.0.0.1:{hr_addr[1]}"
expect = ["{HR}"]
methods = ["GET", "POST"]
paths = ["/timesheets/**"]
""",
    )
    egress = payroll.wait_listener("egress")
    try:
        yield {
            "hr": hr,
            "payroll": payroll,
            "proxy": f"http://127.0.0.1:{egress[1]}",
            "hr_admin": hr.wait_listener("admin"),
            "payroll_admin": payroll.wait_listener("admin"),
        }
    finally:
        payroll.stop()
        hr.stop()


def test_curl_through_egress_proxy(pair: dict[str, Any]) -> None:
    curl = support.require_binary("curl")
    out = subprocess.run(
        [curl, "-sS", "--fail", "-x", pair["proxy"], "http://hr-api/timesheets/2026"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["path"] == "/timesheets/2026"
    assert doc["xfcc"][0].endswith(f"URI={PAYROLL}")
    refused = subprocess.run(
        [
            curl,
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            pair["proxy"],
            "http://unknown.example/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.stdout == "403"
    tunnel = subprocess.run(
        [curl, "-sS", "-p", "-x", pair["proxy"], "http://hr-api/timesheets/1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert tunnel.returncode != 0 and "403" in tunnel.stderr  # CONNECT refused
    record = pair["payroll"].audit.wait_json(event="http.request", reason="egress_not_allowed")
    assert record["decision"] == "deny" and record["status"] == 403
    pair["payroll"].audit.wait_json(event="http.request", reason="connect_not_allowed")


def _client_script(kind: str) -> str:
    if kind == "requests":
        return (
            "import os, requests, sys\n"
            "r = requests.post('http://hr-api/timesheets/batch', data=b'x' * 5_000_000,"
            " timeout=30)\n"
            "print(r.status_code, r.json()['body_len'])\n"
        )
    return (
        "import httpx\n"
        "with httpx.Client(timeout=30) as c:\n"
        "    r = c.post('http://hr-api/timesheets/batch', content=b'x' * 5_000_000)\n"
        "    print(r.status_code, r.json()['body_len'])\n"
    )


@pytest.mark.parametrize("kind", ["requests", "httpx"])
def test_python_clients_via_http_proxy_env(pair: dict[str, Any], kind: str) -> None:
    env = {
        **os.environ,
        "HTTP_PROXY": pair["proxy"],
        "http_proxy": pair["proxy"],
        "NO_PROXY": "",
        "no_proxy": "",
    }
    out = subprocess.run(
        [sys.executable, "-c", _client_script(kind)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["200", "5000000"]
    record = pair["hr"].audit.wait_json(event="http.request", method="POST")
    assert record["bytes_up"] == 5_000_000 and record["rule"] == "payroll-reads-timesheets"


def test_pooling_with_a_new_agent_connection_per_request(pair: dict[str, Any]) -> None:
    curl = support.require_binary("curl")
    hr_audit = pair["hr"].audit
    hr_audit.all_lines()  # what earlier tests left: not this test's connections
    mark = len(hr_audit.seen)
    urls = [f"http://hr-api/timesheets/{i}" for i in range(15)]
    for url in urls:  # one curl process per request: a new agent connection each time
        out = subprocess.run(
            [curl, "-sS", "--fail", "-x", pair["proxy"], url], capture_output=True, timeout=30
        )
        assert out.returncode == 0
    for _ in urls:
        pair["hr"].audit.wait_json(event="http.request", decision="allow")
    opens = [line for line in hr_audit.seen[mark:] if '"connection.open"' in line]
    assert len(opens) <= 2, opens


def test_admin_endpoint(pair: dict[str, Any]) -> None:
    import urllib.request

    host, port = pair["payroll_admin"]
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=10) as r:
        assert r.status == 200
    subprocess.run(
        [support.require_binary("curl"), "-s", "-x", pair["proxy"], "http://hr-api/timesheets/1"],
        capture_output=True,
        timeout=30,
    )
    pair["payroll"].audit.wait_json(event="http.request")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "agent_proxy_requests_total{" in text
    assert 'listener="egress"' in text
    assert "agent_proxy_svid_expiry_timestamp_seconds " in text
    assert 'agent_proxy_identity_reloads_total{result="error"} 0.0' in text


# -- nginx as the local service behind an inbound listener -------------------

_NGINX = """
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
        listen 127.0.0.1:{port};
        location / {{ return 200 "nginx saw xfcc=$http_x_forwarded_client_cert\\n"; }}
    }}
}}
"""


def test_nginx_upstream_behind_inbound(tmp_path: Path, ca_a: TestCA) -> None:
    nginx = support.require_binary("nginx")
    port = support.free_port()
    (tmp_path / "nginx.conf").write_text(_NGINX.format(dir=tmp_path, port=port))
    extra = ["-g", "user root;"] if os.geteuid() == 0 else []
    server = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), *extra],
        stderr=subprocess.PIPE,
    )
    try:
        support.wait_for_port("127.0.0.1", port)
        hr = _start(
            tmp_path,
            "hr",
            _identity(tmp_path, ca_a, "hr", HR)
            + f"""
[[inbound]]
name = "hr-api"
listen = "127.0.0.1:0"
target = "127.0.0.1:{port}"
protocol = "http"
[[inbound.rules]]
peers = ["{PAYROLL}"]
methods = ["GET"]
paths = ["/**"]
""",
        )
        try:
            _, in_port = hr.wait_listener("hr-api")
            ident = tmp_path / "client"
            ca_a.issue(PAYROLL, dns_names=["localhost"]).write(ident, ca_a.bundle_pem())
            out = subprocess.run(
                [
                    support.require_binary("curl"),
                    "-sS",
                    "--fail",
                    "--cert",
                    str(ident / "svid.pem"),
                    "--key",
                    str(ident / "svid_key.pem"),
                    "-k",
                    "-H",
                    "X-Forwarded-Client-Cert: By=forged",
                    f"https://localhost:{in_port}/x",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith("nginx saw xfcc=By=spiffe://a.org/svc/hr;Hash=")
            assert "forged" not in out.stdout and out.stdout.strip().endswith(f"URI={PAYROLL}")
        finally:
            hr.stop()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_check_config(tmp_path: Path, ca_a: TestCA, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        _identity(tmp_path, ca_a, "hr", HR)
        + """
[[inbound]]
name = "hr-api"
listen = "127.0.0.1:8443"
target = "127.0.0.1:8080"
protocol = "http"
[[inbound.rules]]
peers = ["spiffe://a.org/agent/payroll"]
methods = ["GET"]
paths = ["/timesheets/**"]
"""
    )
    # check-config in-process (the CLI entry point); `run` below as a process.
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "hr-api" in out and "/timesheets/**" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('methods = ["GET"]', 'methods = "GET"'))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "inbound[0].rules[0].methods" in err and "Traceback" not in err
    run_bad = subprocess.run(
        [*support.agent_proxy_cmd(), "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run_bad.returncode == 2 and "inbound[0].rules[0].methods" in run_bad.stderr
