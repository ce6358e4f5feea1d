"""Black-box: ``agent-proxy launch --config FILE -- COMMAND``.

Real processes throughout: the launcher, the sidecar it starts and a small
``python -c`` agent. The sidecar's identity comes from the test PKI; its
audit goes to a file so the launcher's stdout carries only what the agent
prints. Nothing sleeps: we wait for log lines and process exits.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import support
from tests.pki import TestCA
from tests.support import DEADLINE, LineReader

AGENT_ID = "spiffe://a.org/agent/payroll"


@dataclass
class Identity:
    dir: Path
    cert: Path
    key: Path
    bundle: Path
    config: Path


def _write_identity(
    directory: Path, ca: TestCA, *, egress: str = "127.0.0.1:0", admin: str = "127.0.0.1:0"
) -> Identity:
    cert, key = ca.issue(AGENT_ID).write(directory, ca.bundle_pem())
    bundle = directory / "bundle.pem"
    config = directory / "sidecar.toml"
    config.write_text(
        f"""
drain_timeout = "3s"
[identity]
source = "files"
cert = "{cert}"
key = "{key}"
bundle = "{bundle}"
[admin]
listen = "{admin}"
[audit]
path = "{directory / "audit.jsonl"}"
[[outbound]]
name = "egress"
listen = "{egress}"
protocol = "http-proxy"
[[outbound.routes]]
name = "hr"
host = "hr-api"
target = "127.0.0.1:9"
expect = ["spiffe://a.org/svc/hr"]
methods = ["GET"]
paths = ["/timesheets/**"]
"""
    )
    return Identity(directory, cert, key, bundle, config)


@pytest.fixture
def ident(tmp_path: Path, ca_a: TestCA) -> Identity:
    return _write_identity(tmp_path / "id", ca_a)


class Launcher:
    """``agent-proxy launch`` as a subprocess; its stderr carries the
    sidecar's logs and its own."""

    def __init__(
        self,
        config: Path,
        agent: str | list[str],
        *agent_args: str,
        flags: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [
                *support.agent_proxy_cmd(),
                "launch",
                "--config",
                str(config),
                *flags,
                "--",
                *([sys.executable, "-c", agent] if isinstance(agent, str) else agent),
                *agent_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.out = LineReader(self.proc.stdout)
        self.logs = LineReader(self.proc.stderr)

    def started(self) -> dict[str, object]:
        return self.logs.wait_json(event="agent started", search_seen=True)

    def wait(self, deadline: float = 4 * DEADLINE) -> int:
        try:
            return self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def launched() -> Iterator[list[Launcher]]:
    procs: list[Launcher] = []
    yield procs
    for p in procs:
        p.stop()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# The agent reports its environment, then asks the egress proxy for a host no
# route names: the sidecar's 403 proves HTTP_PROXY leads to it, and that it was
# ready before the agent started.
ENV_AGENT = r"""
import json, os, urllib.error, urllib.request
try:
    urllib.request.urlopen("http://not-routed.example/x", timeout=10)
    answer = "no error"
except urllib.error.HTTPError as exc:
    answer = f"{exc.code} {json.loads(exc.read())['reason']}"
print(json.dumps({"env": dict(os.environ), "answer": answer}), flush=True)
"""

WAIT_FOREVER = "import threading; print('agent up', flush=True); threading.Event().wait()"


def test_agent_gets_the_proxy_and_no_identity_paths(
    ident: Identity, launched: list[Launcher]
) -> None:
    extra = {
        "SVID_KEY": str(ident.key),  # names the key
        "TLS_FILES": f"/opt/x:{ident.cert}",  # names the certificate in a list
        "SVID_DIR": str(ident.dir),  # the directory that holds them
        "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock",
        "AGENT_PROXY_CONFIG": str(ident.config),
        "NO_PROXY": "hr-api,.example",  # would send routed hosts around the sidecar
        "UNRELATED": "kept",
    }
    launcher = Launcher(ident.config, ENV_AGENT, env=extra)
    launched.append(launcher)
    report = json.loads(launcher.out.wait_for(lambda line: line.startswith("{")))
    assert launcher.wait() == 0
    egress = launcher.logs.wait_json(event="listening", listener="egress", search_seen=True)
    proxy = f"http://{egress['address']}"
    env: dict[str, str] = report["env"]
    assert env["HTTP_PROXY"] == proxy
    assert env["http_proxy"] == proxy
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    assert report["answer"] == "403 egress_not_allowed"
    assert env["UNRELATED"] == "kept"
    for name in ("SVID_KEY", "TLS_FILES", "SVID_DIR", "SPIFFE_ENDPOINT_SOCKET"):
        assert name not in env
    assert not [k for k in env if k.startswith("AGENT_PROXY_")]
    for name, value in env.items():
        for path in (ident.key, ident.cert, ident.bundle, ident.dir):
            assert str(path) not in value, f"{name} names {path}"


def test_exit_status_propagates(ident: Identity, launched: list[Launcher]) -> None:
    launcher = Launcher(ident.config, "import sys; sys.exit(7)")
    launched.append(launcher)
    assert launcher.wait() == 7
    # The sidecar drained and stopped before the launcher exited.
    launcher.logs.wait_json(event="stopped", search_seen=True)
    sidecar = int(str(launcher.started()["sidecar_pid"]))
    assert _gone(sidecar)


def test_console_log_format_renders_the_sidecars_lines_for_people(
    ident: Identity, launched: list[Launcher]
) -> None:
    # The sidecar still speaks JSON to the launcher (readiness, addresses);
    # the launcher renders its lines, and its own, for the console.
    launcher = Launcher(
        ident.config, "print('agent ran', flush=True)", env={"AGENT_PROXY_LOG_FORMAT": "console"}
    )
    launched.append(launcher)
    launcher.out.wait_for(lambda line: line == "agent ran")
    assert launcher.wait() == 0
    lines = launcher.logs.all_lines()
    assert any("listening" in x and "egress" in x for x in lines), lines
    assert any("agent started" in x for x in lines), lines
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)


def test_sigterm_stops_agent_then_sidecar(ident: Identity, launched: list[Launcher]) -> None:
    launcher = Launcher(ident.config, WAIT_FOREVER)
    launched.append(launcher)
    launcher.out.wait_for(lambda line: line == "agent up")
    pids = launcher.started()
    launcher.proc.send_signal(signal.SIGTERM)
    # The agent died of the forwarded SIGTERM; the launcher reports it as a shell does.
    assert launcher.wait() == 128 + signal.SIGTERM
    assert _gone(int(str(pids["agent_pid"])))
    assert _gone(int(str(pids["sidecar_pid"])))
    exited = launcher.logs.wait_json(event="agent exited", search_seen=True)
    assert exited["status"] == -signal.SIGTERM
    # The sidecar was told to stop after the agent, and drained.
    launcher.logs.wait_json(event="draining", signal="SIGTERM", search_seen=True)
    launcher.logs.wait_json(event="stopped", search_seen=True)


def test_sidecar_crash_stops_the_agent(ident: Identity, launched: list[Launcher]) -> None:
    launcher = Launcher(ident.config, WAIT_FOREVER)
    launched.append(launcher)
    launcher.out.wait_for(lambda line: line == "agent up")
    pids = launcher.started()
    os.kill(int(str(pids["sidecar_pid"])), signal.SIGKILL)
    status = launcher.wait()
    assert status == 70
    assert _gone(int(str(pids["agent_pid"])))
    line = launcher.logs.wait_for(lambda x: "sidecar exited" in x, search_seen=True)
    assert line.startswith("agent-proxy: launch: ")


class _StandIn(http.server.BaseHTTPRequestHandler):
    """Another sidecar on our ports: ready, and a willing egress proxy."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def stand_in_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_another_process_on_our_ports_is_not_our_sidecar(
    tmp_path: Path, ca_a: TestCA, launched: list[Launcher]
) -> None:
    # Security: readiness comes only from our own child (its --ready-fd
    # pipe), never from whatever answers /readyz or the egress port.
    marker = tmp_path / "agent-ran"
    with stand_in_server() as admin, stand_in_server() as egress:
        ident = _write_identity(
            tmp_path / "busy", ca_a, egress=f"127.0.0.1:{egress}", admin=f"127.0.0.1:{admin}"
        )
        launcher = Launcher(ident.config, f"open({str(marker)!r}, 'w').close()")
        launched.append(launcher)
        assert launcher.wait() == 70
    assert not marker.exists()
    line = launcher.logs.wait_for(lambda x: "before it was ready" in x, search_seen=True)
    assert line.startswith("agent-proxy: launch: the sidecar exited with status 2")
    assert "Address already in use" in line  # the child's own bind error
    assert not any("agent started" in x for x in launcher.logs.all_lines())


def test_user_flag_needs_root(
    ident: Identity, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The CLI path in-process, as a non-root user would see it.
    from proxy.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status = main(["launch", "--config", str(ident.config), "--user", "0", "--", "true"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "need root" in err


def test_an_identity_that_does_not_load_is_refused_before_any_process_starts(
    ident: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # launch runs the same plan and identity checks as check-config: a key
    # that is not the certificate's is one line and exit 2, and neither the
    # sidecar nor the agent is started (the agent would create the marker).
    from proxy.cli import main

    ident.key.write_bytes(TestCA.create("a.org").issue(AGENT_ID).key_pem())
    marker = tmp_path / "agent-ran"
    status = main(["launch", "--config", str(ident.config), "--", "touch", str(marker)])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "identity" in err
    assert not marker.exists()


# The agent tries to read each file it is given. /bin/sh, not Python: the
# test's interpreter may live where the other user cannot reach it.
READ_FILES_AGENT = [
    "/bin/sh",
    "-c",
    'for f in "$@"; do if cat "$f" >/dev/null 2>&1; then echo "read $f"; '
    'else echo "denied $f"; fi; done; echo done',
    "agent",
]


def test_agent_under_another_user_cannot_read_the_key(
    ca_a: TestCA, launched: list[Launcher]
) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true runs as root; this test must run there")
        pytest.skip("needs root to start the agent as another user")
    # pytest's tmp_path is 0700: a denial there would come from the directory,
    # not from the key's mode. Use a world-traversable directory instead.
    base = Path(tempfile.mkdtemp(prefix="launch-root-"))
    try:
        base.chmod(0o755)
        ident = _write_identity(base / "id", ca_a)
        ident.dir.chmod(0o755)
        assert ident.key.stat().st_mode & 0o777 == 0o600
        assert ident.key.stat().st_uid == 0
        launcher = Launcher(
            ident.config,
            READ_FILES_AGENT,
            str(ident.key),
            str(ident.cert),
            flags=("--user", "nobody"),
        )
        launched.append(launcher)
        launcher.out.wait_for(lambda line: line == "done")
        assert launcher.wait() == 0
        # The certificate is public and readable, so the key's denial comes
        # from its mode (0600, root), not from the directories above it.
        assert launcher.out.seen == [f"denied {ident.key}", f"read {ident.cert}", "done"]
        started = launcher.started()
        assert started["user"] == 65534
    finally:
        shutil.rmtree(base, ignore_errors=True)
