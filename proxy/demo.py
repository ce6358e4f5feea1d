"""``make demo``: the sidecar pair end to end with real processes.

A dev CA for payroll.example; an HR API on loopback behind HR's inbound
sidecar; the payroll agent's outbound sidecar; the payroll agent (a stock
HTTP client) calls HR through it; a marketing agent's sidecar, holding a
valid SVID that HR does not allow, is refused. Prints what the HR API saw
and a summary of both audit trails, stops everything and exits 0.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

TD = "payroll.example"


def _agent_proxy(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


class _HrApi(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(
            {"timesheets": [{"employee": "ada", "hours": 38}], "path": self.path}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Sidecar:
    def __init__(self, name: str, args: Sequence[str], audit: Path) -> None:
        self.name = name
        self.audit = audit
        self.proc = subprocess.Popen(
            _agent_proxy(*args, "--listen", "127.0.0.1:0", "--audit-log", str(audit)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = self._wait_listening(self.proc.stderr)

    @staticmethod
    def _wait_listening(stream: IO[str] | None) -> int:
        assert stream is not None
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
                return int(str(event["address"]).rpartition(":")[2])
        raise RuntimeError("sidecar exited before listening")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def _identity(root: Path, name: str) -> list[str]:
    d = root / name
    return [
        "--cert",
        str(d / "svid.pem"),
        "--key",
        str(d / "svid_key.pem"),
        "--bundle",
        str(d / "bundle.pem"),
    ]


def _call(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return f"{resp.status} {resp.read().decode()}"
    except (urllib.error.URLError, ConnectionError) as exc:
        return f"refused ({exc.__class__.__name__})"


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="agent-proxy-demo-"))
    print(f"== dev CA and SVIDs in {root}")
    subprocess.run(
        _agent_proxy("ca", "init", "--trust-domain", TD, "--dir", str(root / "ca")),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for name, path in (
        ("hr", "/svc/hr"),
        ("payroll", "/agent/payroll"),
        ("marketing", "/agent/marketing"),
    ):
        subprocess.run(
            _agent_proxy(
                "ca",
                "issue",
                "--dir",
                str(root / "ca"),
                "--spiffe-id",
                f"spiffe://{TD}{path}",
                "--out",
                str(root / name),
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(f"   issued spiffe://{TD}{path}")

    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HrApi)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    sidecars: list[_Sidecar] = []
    try:
        hr = _Sidecar(
            "hr inbound",
            [
                "inbound",
                "--name",
                "hr-api",
                "--target",
                f"127.0.0.1:{api.server_address[1]}",
                *_identity(root, "hr"),
                "--allow",
                f"spiffe://{TD}/agent/payroll",
            ],
            root / "hr-audit.jsonl",
        )
        sidecars.append(hr)
        payroll = _Sidecar(
            "payroll outbound",
            [
                "outbound",
                "--name",
                "to-hr",
                "--target",
                f"127.0.0.1:{hr.port}",
                *_identity(root, "payroll"),
                "--expect",
                f"spiffe://{TD}/svc/hr",
            ],
            root / "payroll-audit.jsonl",
        )
        sidecars.append(payroll)
        marketing = _Sidecar(
            "marketing outbound",
            [
                "outbound",
                "--name",
                "to-hr",
                "--target",
                f"127.0.0.1:{hr.port}",
                *_identity(root, "marketing"),
                "--expect",
                f"spiffe://{TD}/svc/hr",
            ],
            root / "marketing-audit.jsonl",
        )
        sidecars.append(marketing)

        print("\n== payroll agent → its sidecar → mTLS → HR's sidecar → HR API")
        print("   GET /timesheets/2026-11:", _call(payroll.port, "/timesheets/2026-11"))
        print("\n== marketing agent → its sidecar → HR (valid SVID, not allowed)")
        print("   GET /timesheets/2026-11:", _call(marketing.port, "/timesheets/2026-11"))
    finally:
        for sidecar in reversed(sidecars):
            sidecar.stop()
        api.shutdown()

    print("\n== audit trail")
    for sidecar in sidecars:
        for line in sidecar.audit.read_text().splitlines():
            r = json.loads(line)
            print(
                f"   [{sidecar.name:18}] {r['event']:18} {r['decision']:5} {r['reason']:18} "
                f"peer={r['peer_id']}"
            )
    if os.environ.get("AGENT_PROXY_DEMO_KEEP") is None:
        import shutil

        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
