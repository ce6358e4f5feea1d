"""Hot reload against the real process: a broken file keeps the old rules,
a good file (after SIGHUP, or just by changing) applies new ones, and a
change that needs a restart says so."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.blackbox.test_http_sidecar import _Echo  # an HTTP origin that echoes requests
from tests.pki import TestCA
from tests.support import ProxyProcess

PAYROLL = "spiffe://a.org/agent/payroll"


@pytest.fixture
def origin() -> Iterator[tuple[str, int]]:
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ("127.0.0.1", int(server.server_address[1]))
    server.shutdown()
    server.server_close()


def _config(tmp: Path, origin: tuple[str, int], paths: str, listen: str = "127.0.0.1:0") -> str:
    d = tmp / "hr"
    return (
        f'[identity]\nsource = "files"\ncert = "{d}/svid.pem"\nkey = "{d}/svid_key.pem"\n'
        f'bundle = "{d}/bundle.pem"\n[admin]\nlisten = ""\n'
        f'[[inbound]]\nname = "hr"\nlisten = "{listen}"\n'
        f'target = "{origin[0]}:{origin[1]}"\nprotocol = "http"\n'
        f'[[inbound.rules]]\nname = "reads"\npeers = ["{PAYROLL}"]\nmethods = ["GET"]\n'
        f"paths = {paths}\n"
    )


def _get(port: int, client: Path, path: str) -> int:
    out = subprocess.run(
        [
            support.require_binary("curl"),
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-k",
            "--cert",
            str(client / "svid.pem"),
            "--key",
            str(client / "svid_key.pem"),
            f"https://localhost:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(out.stdout or 0)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_broken_file_then_good_file(tmp_path: Path, ca_a: TestCA, origin: tuple[str, int]) -> None:
    ca_a.issue("spiffe://a.org/svc/hr").write(tmp_path / "hr", ca_a.bundle_pem())
    client = tmp_path / "client"
    ca_a.issue(PAYROLL, dns_names=["localhost"]).write(client, ca_a.bundle_pem())
    config = tmp_path / "sidecar.toml"
    config.write_text(_config(tmp_path, origin, '["/timesheets/**"]'))
    proc = ProxyProcess(["run", "--config", str(config)])
    try:
        _, port = proc.wait_listener("hr")
        assert _get(port, client, "/timesheets/1") == 200
        assert _get(port, client, "/payslips/1") == 403

        # A broken file: the old rules stay, the error is logged.
        _write(config, _config(tmp_path, origin, '["/timesheets/**"').replace("]\n", "\n"))
        proc.proc.send_signal(signal.SIGHUP)
        failed = proc.logs.wait_json(event="config reload failed; keeping the current rules")
        assert "sidecar.toml" in failed["error"]
        assert _get(port, client, "/timesheets/2") == 200

        # A good file: picked up by the watcher, no signal needed.
        _write(config, _config(tmp_path, origin, '["/timesheets/**", "/payslips/**"]'))
        reloaded = proc.logs.wait_json(event="rules reloaded", deadline=20)
        assert reloaded["policy_version"].startswith("sha256:")
        assert _get(port, client, "/payslips/1") == 200

        # A new listen address cannot be applied by a reload: it says so.
        _write(config, _config(tmp_path, origin, '["/**"]', listen="127.0.0.1:1"))
        proc.proc.send_signal(signal.SIGHUP)
        warning = proc.logs.wait_json(
            event="config changed in ways a reload cannot apply; restart to use them "
            "(rules unchanged)"
        )
        assert warning["changed"] == ["inbound[0].listen"]
        assert _get(port, client, "/other") == 403
    finally:
        assert proc.stop() == 0
