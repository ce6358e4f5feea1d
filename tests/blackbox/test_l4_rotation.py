"""Black-box: ``agent-proxy inbound``/``outbound`` run the same plan as
``run``: their files rotate under load, a garbage write keeps the old
identity, SIGHUP re-reads at once, ``--admin`` serves health and metrics.
And ``run``: a TCP peer revoked by editing ``peers`` plus SIGHUP is refused
in the handshake; a port in use names the listener; bad paths are one line
from check-config."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import signal
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import support
from tests.blackbox.test_hot_reload import _config as http_config
from tests.blackbox.test_hot_reload import _Echo, _get
from tests.blackbox.test_rotation_load import (
    ClientLoop,
    _reissue,
    _write_atomic,
    reissue_every_second,
    serial,
)
from tests.pki import TestCA
from tests.support import ProxyProcess

HR = "spiffe://a.org/svc/hr"
PAYROLL = "spiffe://a.org/agent/payroll"


def _files(directory: Path) -> list[str]:
    return [
        "--cert", str(directory / "svid.pem"),
        "--key", str(directory / "svid_key.pem"),
        "--bundle", str(directory / "bundle.pem"),
    ]  # fmt: skip


def _http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address[0]}:{address[1]}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class L4Pair:
    hr: ProxyProcess  # the inbound, with --admin
    payroll: ProxyProcess  # the outbound in front of it
    admin: tuple[str, int]
    out_port: int
    hr_dir: Path
    payroll_dir: Path


@contextlib.contextmanager
def l4_pair(
    tmp_path: Path, ca: TestCA, echo: tuple[str, int], *inbound_flags: str
) -> Iterator[L4Pair]:
    """``agent-proxy outbound`` -> ``agent-proxy inbound --admin`` -> echo,
    SVIDs from files; both stopped on the way out."""
    hr_dir, payroll_dir = tmp_path / "hr", tmp_path / "payroll"
    ca.issue(HR).write(hr_dir, ca.bundle_pem())
    ca.issue(PAYROLL).write(payroll_dir, ca.bundle_pem())
    hr = ProxyProcess(
        ["inbound", "--listen", "127.0.0.1:0", "--target", f"{echo[0]}:{echo[1]}",
         *_files(hr_dir), "--allow", PAYROLL, "--admin", "127.0.0.1:0", *inbound_flags]
    )  # fmt: skip
    payroll = None
    try:
        _, hr_port = hr.wait_listener("inbound")
        admin = hr.wait_listener("admin")
        payroll = ProxyProcess(
            ["outbound", "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{hr_port}",
             *_files(payroll_dir), "--expect", HR]
        )  # fmt: skip
        _, out_port = payroll.wait_listener("outbound")
        yield L4Pair(hr, payroll, admin, out_port, hr_dir, payroll_dir)
    finally:
        if payroll is not None:
            payroll.stop()
        hr.stop()


def test_l4_pair_rotates_reloads_and_serves_admin(
    tmp_path: Path, ca_a: TestCA, echo: tuple[str, int]
) -> None:
    loop = None
    flags = ("--handshake-timeout", "1m30s", "--write-timeout", "30s")
    with l4_pair(tmp_path, ca_a, echo, *flags) as pair:
        hr, payroll, admin, out_port = pair.hr, pair.payroll, pair.admin, pair.out_port
        hr_dir, payroll_dir = pair.hr_dir, pair.payroll_dir
        try:
            # --admin: the same endpoint as run's.
            assert _http_get(admin, "/healthz")[0] == 200
            assert (
                _http_get(admin, "/readyz") == (200, "ready\n")
                or _http_get(admin, "/readyz")[0] == 200
            )
            status, metrics = _http_get(admin, "/metrics")
            assert status == 200 and "agent_proxy_svid_expiry" in metrics
            assert 'agent_proxy_policy_info{version="sha256:' in metrics

            # Files reissued every second for 10 s under load: nothing fails,
            # later connections present the newest serials.
            loop = ClientLoop(out_port)
            final = reissue_every_second(
                ca_a, {"hr": (HR, hr_dir), "payroll": (PAYROLL, payroll_dir)}
            )
            payroll.audit.wait_json(
                event="connection.open", peer_cert_serial=serial(final["hr"]), deadline=30
            )
            hr.audit.wait_json(
                event="connection.open", peer_cert_serial=serial(final["payroll"]), deadline=30
            )

            # A garbage write keeps the current identity serving.
            (hr_dir / "svid.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
            hr.logs.wait_json(event="identity reload failed; keeping the current identity")
            # The next good write is picked up within 2 s (the poll is 1 s).
            good = _reissue(ca_a, HR, hr_dir)
            hr.logs.wait_json(event="identity rotated", serial=serial(good), deadline=2.0)

            # SIGHUP re-reads the files at once, and reloads nothing else.
            newest = _reissue(ca_a, PAYROLL, payroll_dir)
            payroll.proc.send_signal(signal.SIGHUP)
            payroll.logs.wait_json(event="identity rotated", serial=serial(newest), deadline=2.0)
            payroll.logs.wait_json(event="config reloaded; rules unchanged", search_seen=True)
            hr.audit.wait_json(
                event="connection.open", peer_cert_serial=serial(newest), deadline=10
            )
        finally:
            if loop is not None:
                loop.finish()  # before the pair stops: its last connections must not fail
    assert loop is not None and len(loop.results) > 20, "the client loop barely ran"
    assert all(loop.results), loop.errors[:5]


def _run_config(directory: Path, target: tuple[str, int], peers: str, listen: str) -> str:
    return (
        f'[identity]\nsource = "files"\ncert = "{directory}/svid.pem"\n'
        f'key = "{directory}/svid_key.pem"\nbundle = "{directory}/bundle.pem"\n'
        f'[admin]\nlisten = ""\n'
        f'[[inbound]]\nname = "hr"\nlisten = "{listen}"\ntarget = "{target[0]}:{target[1]}"\n'
        f'protocol = "tcp"\n[[inbound.rules]]\npeers = {peers}\n'
    )


def _roundtrip(port: int, client: Path) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(client / "svid.pem", client / "svid_key.pem")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"ping")
        return tls.recv(10)


def test_revoking_a_tcp_peer_with_sighup(
    tmp_path: Path, ca_a: TestCA, echo: tuple[str, int]
) -> None:
    ca_a.issue(HR).write(tmp_path / "hr", ca_a.bundle_pem())
    client = tmp_path / "client"
    ca_a.issue(PAYROLL).write(client, ca_a.bundle_pem())
    config = tmp_path / "hr.toml"
    config.write_text(_run_config(tmp_path / "hr", echo, f'["{PAYROLL}"]', "127.0.0.1:0"))
    proc = ProxyProcess(["run", "--config", str(config)])
    try:
        _, port = proc.wait_listener("hr")
        assert _roundtrip(port, client) == b"ping"
        _write_atomic(
            config,
            _run_config(
                tmp_path / "hr", echo, '["spiffe://a.org/agent/other"]', "127.0.0.1:0"
            ).encode(),
            0o644,
        )
        proc.proc.send_signal(signal.SIGHUP)
        proc.logs.wait_json(event="rules reloaded")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            if _roundtrip(port, client) == b"":
                raise ConnectionError("closed")
        refused = proc.audit.wait_json(event="connection.refused", reason="peer_not_allowed")
        assert refused["peer_id"] == PAYROLL
    finally:
        assert proc.stop() == 0


def _agent_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*support.agent_proxy_cmd(), *args], capture_output=True, text=True, timeout=30
    )


def test_run_port_in_use_names_the_listener(tmp_path: Path, ca_a: TestCA) -> None:
    ca_a.issue(HR).write(tmp_path / "hr", ca_a.bundle_pem())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "hr.toml"
        config.write_text(
            _run_config(tmp_path / "hr", ("127.0.0.1", 9), f'["{PAYROLL}"]', f"127.0.0.1:{port}")
        )
        result = _agent_proxy("run", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("agent-proxy: error")]
    assert errors == [
        f"agent-proxy: error: cannot listen on inbound 'hr' 127.0.0.1:{port}: "
        "Address already in use"
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('[audit]\npath = "audit/a\\u0000b"\n', "audit.path: must not contain a NUL byte"),
        ('[audit]\npath = "~nosuchuser-ap/a"\n', "audit.path: cannot expand"),
    ],
)
def test_check_config_bad_paths_one_line(
    tmp_path: Path, ca_a: TestCA, line: str, needle: str
) -> None:
    ca_a.issue(HR).write(tmp_path / "hr", ca_a.bundle_pem())
    config = tmp_path / "hr.toml"
    config.write_text(
        line + _run_config(tmp_path / "hr", ("127.0.0.1", 9), f'["{PAYROLL}"]', "127.0.0.1:0")
    )
    for command in (["check-config", str(config)], ["run", "--config", str(config)]):
        result = _agent_proxy(*command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and needle in result.stderr


def test_one_policy_version_everywhere(tmp_path: Path, ca_a: TestCA) -> None:
    """check-config prints the version that audit records and /metrics carry."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = ("127.0.0.1", int(server.server_address[1]))
    ca_a.issue(HR).write(tmp_path / "hr", ca_a.bundle_pem())
    client = tmp_path / "client"
    ca_a.issue(PAYROLL, dns_names=["localhost"]).write(client, ca_a.bundle_pem())
    config = tmp_path / "sidecar.toml"
    config.write_text(
        http_config(tmp_path, origin, '["/timesheets/**"]').replace(
            'listen = ""', 'listen = "127.0.0.1:0"'
        )
    )
    checked = _agent_proxy("check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    [version] = [
        ln.split(": ", 1)[1]
        for ln in checked.stdout.splitlines()
        if ln.startswith("policy version")
    ]
    proc = ProxyProcess(["run", "--config", str(config)])
    try:
        _, port = proc.wait_listener("hr")
        admin = proc.wait_listener("admin")
        assert _get(port, client, "/timesheets/1") == 200
        record = proc.audit.wait_json(event="http.request")
        metrics = _http_get(admin, "/metrics")[1]
    finally:
        proc.stop()
        server.shutdown()
        server.server_close()
    assert record["policy_version"] == version
    assert f'agent_proxy_policy_info{{version="{version}"}} 1.0' in metrics


def test_l4_warns_fails_closed_at_expiry_and_recovers(
    tmp_path: Path, ca_a: TestCA, echo: tuple[str, int]
) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_a.issue(
        HR, not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(seconds=8)
    ).write(tmp_path / "hr", ca_a.bundle_pem())
    client = tmp_path / "client"
    ca_a.issue(PAYROLL).write(client, ca_a.bundle_pem())
    proc = ProxyProcess(
        ["inbound", "--listen", "127.0.0.1:0", "--target", f"{echo[0]}:{echo[1]}",
         *_files(tmp_path / "hr"), "--allow", PAYROLL, "--admin", "127.0.0.1:0"]
    )  # fmt: skip
    try:
        _, port = proc.wait_listener("inbound")
        admin = proc.wait_listener("admin")
        # Under 20% of its lifetime left: a warning on stderr.
        proc.logs.wait_json(
            event="our SVID expires soon and has not been rotated", search_seen=True
        )
        proc.logs.wait_json(event="our SVID has expired", deadline=30, search_seen=True)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            if _roundtrip(port, client) == b"":
                raise ConnectionError("closed")
        proc.audit.wait_json(event="connection.refused", reason="own_svid_expired")
        assert _http_get(admin, "/readyz")[0] == 503
        fresh = _reissue(ca_a, HR, tmp_path / "hr")
        proc.logs.wait_json(event="identity rotated", serial=serial(fresh))
        assert _roundtrip(port, client) == b"ping"
        assert _http_get(admin, "/readyz")[0] == 200
    finally:
        proc.stop()
