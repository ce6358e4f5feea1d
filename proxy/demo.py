"""``make demo``: the payroll scenario end to end, with real processes.

The cast: a dev CA for payroll.example; an HR API and a bank API, each
behind its own inbound sidecar; the payroll agent and the marketing agent,
each a small script using a stock HTTP client (urllib, via HTTP_PROXY)
through its own egress sidecar. Every sidecar is ``agent-proxy run`` with its
own config file. The demo shows allowed and refused calls, the identity the
HR API received, and a summary of every sidecar's audit trail; then it stops
everything and exits 0.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

from proxy.credentials.demo import run_brownfield_leg

TD = "payroll.example"
CAST = {
    "hr": "/svc/hr",
    "bank": "/svc/bank",
    "payroll": "/agent/payroll",
    "marketing": "/agent/marketing",
}

# What an agent runs: a stock HTTP client that honours HTTP_PROXY.
AGENT = r"""
import json, sys, urllib.request, urllib.error
for line in sys.argv[1:]:
    method, url, *body = line.split(" ", 2)
    data = body[0].encode() if body else None
    req = urllib.request.Request(url, method=method, data=data,
                                 headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            out = f"{resp.status} {resp.read().decode()}"
    except urllib.error.HTTPError as exc:
        out = f"{exc.code} {exc.read().decode()}"
    except (urllib.error.URLError, ConnectionError) as exc:
        out = f"failed: {exc}"
    print(json.dumps({"call": f"{method} {url}", "result": out}), flush=True)
"""


def _agent_proxy(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


class _Api(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    name = "api"

    def _reply(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body_in = self.rfile.read(length) if length else b""
        seen = self.headers.get("x-forwarded-client-cert", "")
        payload = {
            "api": self.name,
            "method": self.command,
            "path": self.path,
            "caller": seen.rpartition("URI=")[2] or None,
        }
        if body_in:
            payload["received"] = json.loads(body_in)
        self.server.seen.append(seen)  # type: ignore[attr-defined]
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _reply

    def log_message(self, *args: Any) -> None:
        pass


def _api(name: str) -> http.server.ThreadingHTTPServer:
    handler = type(f"{name.title()}Api", (_Api,), {"name": name})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Sidecar:
    """One ``agent-proxy run``: started at once, waited for with :meth:`ready`,
    so several sidecars start side by side."""

    def __init__(self, root: Path, name: str, body: str) -> None:
        self.name = name
        self.audit = root / f"{name}-audit.jsonl"
        ident = root / name
        config = root / f"{name}.toml"
        config.write_text(
            f'[identity]\nsource = "files"\ncert = "{ident}/svid.pem"\n'
            f'key = "{ident}/svid_key.pem"\nbundle = "{ident}/bundle.pem"\n'
            f'[admin]\nlisten = "127.0.0.1:0"\n[audit]\npath = "{self.audit}"\n' + body
        )
        self.proc = subprocess.Popen(
            _agent_proxy("run", "--config", str(config), "--log-format", "json"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = 0

    def ready(self) -> _Sidecar:
        """Wait for its ``ready`` line; its listener's port is then known."""
        stream = self.proc.stderr
        assert stream is not None
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                sys.stderr.write(line)
                continue
            if event.get("event") == "listening":
                self.port = int(str(event["address"]).rpartition(":")[2])
            elif event.get("event") == "ready":
                # Keep draining stderr so the sidecar never blocks on a full pipe.
                threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
                return self
        raise RuntimeError(f"the {self.name} sidecar exited before it was ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _inbound(name: str, target: int, rules: str) -> str:
    return (
        f'[[inbound]]\nname = "{name}"\nlisten = "127.0.0.1:0"\n'
        f'target = "127.0.0.1:{target}"\nprotocol = "http"\n' + rules
    )


def _run_agent(proxy_port: int, calls: list[str]) -> list[dict[str, str]]:
    env = {
        **os.environ,
        "HTTP_PROXY": f"http://127.0.0.1:{proxy_port}",
        "http_proxy": f"http://127.0.0.1:{proxy_port}",
        "NO_PROXY": "",
        "no_proxy": "",
    }
    out = subprocess.run(
        [sys.executable, "-c", AGENT, *calls],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def _short(result: str) -> str:
    """``403 {"reason": ...}`` as ``403 reason (error)``: the refusal's code first."""
    status, _, body = result.partition(" ")
    try:
        parsed = json.loads(body)
    except ValueError:
        return result
    if isinstance(parsed, dict) and "reason" in parsed:
        return f"{status} {parsed['reason']} ({parsed.get('error', '')})"
    return result


def _print_calls(who: str, results: list[dict[str, str]]) -> None:
    width = shutil.get_terminal_size((120, 24)).columns
    for r in results:
        line = f"   {who:9} {r['call']:48} -> {_short(r['result'])}"
        print(line if len(line) <= width else line[: max(width - 3, 70)] + "...")


SUMMARY_HEADS = ("sidecar", "event", "decision", "reason", "peer", "request/target", "rule")


def summary_rows(sidecar: str, records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per decision record; a request row names the request, a
    connection row the target it was for (never its event a second time)."""
    rows: list[tuple[str, ...]] = []
    for r in records:
        # Close records repeat their open; chain records (checkpoints,
        # genesis, gaps) seal the trail and decide nothing.
        if r["event"] == "connection.close" or "decision" not in r:
            continue
        request = f"{r.get('method', '')} {r.get('path', '')}".strip()
        rows.append(
            (
                sidecar,
                str(r["event"]),
                str(r["decision"]),
                str(r["reason"]),
                str(r.get("peer_id") or "-"),
                str(request or r.get("target") or "-"),
                str(r.get("rule") or "-"),
            )
        )
    return rows


def summary_table(rows: list[tuple[str, ...]], width: int) -> list[str]:
    """The rows as aligned columns in ``width``: all seven on one line when
    they fit; otherwise the decision (sidecar, event, decision, reason) on
    one line and who and what (peer, request or target, rule) beneath it:
    aligned, or on one line, or one field a line, wrapped, whichever fits."""
    indent, under = "   ", "      "

    def aligned(cells: list[tuple[str, ...]], prefix: str) -> list[str] | None:
        widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
        if len(prefix) + sum(widths) + 2 * (len(widths) - 1) > width:
            return None
        return [
            (prefix + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
            for row in cells
        ]

    whole = aligned([SUMMARY_HEADS, *rows], indent)
    if whole is not None:
        return whole
    firsts = aligned([r[:4] for r in rows], indent) or [indent + " ".join(r[:4]) for r in rows]
    seconds = aligned([r[4:] for r in rows], under)
    out: list[str] = []
    for i, row in enumerate(rows):
        out += textwrap.wrap(firsts[i], width, subsequent_indent=under) or [firsts[i]]
        if seconds is not None:
            out.append(seconds[i])
            continue
        labelled = list(zip(("peer", "request/target", "rule"), row[4:], strict=True))
        one_line = under + "  ".join(f"{name}={value}" for name, value in labelled)
        if len(one_line) <= width:
            out.append(one_line)
            continue
        for name, value in labelled:
            out += textwrap.wrap(
                f"{name}: {value}", width, initial_indent=under, subsequent_indent=under + "  "
            )
    return out


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="agent-proxy-demo-"))
    print(f"== a dev CA for {TD}, one SVID per workload ({root})")
    subprocess.run(
        _agent_proxy("ca", "init", "--trust-domain", TD, "--dir", str(root / "ca")),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    issuing = {
        name: subprocess.Popen(
            _agent_proxy(
                *("ca", "issue", "--dir", str(root / "ca")),
                *("--spiffe-id", f"spiffe://{TD}{path}", "--out", str(root / name)),
            ),
            stdout=subprocess.DEVNULL,
        )
        for name, path in CAST.items()
    }
    for name, proc in issuing.items():
        if proc.wait() != 0:
            raise RuntimeError(f"agent-proxy ca issue for {name} failed")
        print(f"   {name:9} spiffe://{TD}{CAST[name]}")

    hr_api, bank_api = _api("hr"), _api("bank")
    sidecars: list[_Sidecar] = []
    try:
        hr = _Sidecar(
            root,
            "hr",
            _inbound(
                "hr-api",
                hr_api.server_address[1],
                f"""
[[inbound.rules]]
name = "payroll-reads-timesheets"
peers = ["spiffe://{TD}/agent/payroll"]
methods = ["GET"]
paths = ["/timesheets/**"]
""",
            ),
        )
        sidecars.append(hr)
        bank = _Sidecar(
            root,
            "bank",
            _inbound(
                "bank-api",
                bank_api.server_address[1],
                f"""
[[inbound.rules]]
name = "payroll-files-payments"
peers = ["spiffe://{TD}/agent/payroll"]
methods = ["POST"]
paths = ["/payments"]
""",
            ),
        )
        sidecars.append(bank)
        hr.ready(), bank.ready()
        payroll = _Sidecar(
            root,
            "payroll",
            f"""
[[outbound]]
name = "payroll-egress"
listen = "127.0.0.1:0"
protocol = "http-proxy"
[[outbound.routes]]
name = "hr"
host = "hr-api"
target = "127.0.0.1:{hr.port}"
expect = ["spiffe://{TD}/svc/hr"]
methods = ["GET", "DELETE"]
paths = ["/timesheets/**"]
[[outbound.routes]]
name = "bank"
host = "bank-api"
target = "127.0.0.1:{bank.port}"
expect = ["spiffe://{TD}/svc/bank"]
methods = ["POST"]
paths = ["/payments"]
""",
        )
        sidecars.append(payroll)
        marketing = _Sidecar(
            root,
            "marketing",
            f"""
[[outbound]]
name = "marketing-egress"
listen = "127.0.0.1:0"
protocol = "http-proxy"
[[outbound.routes]]
name = "hr"
host = "hr-api"
target = "127.0.0.1:{hr.port}"
expect = ["spiffe://{TD}/svc/hr"]
methods = ["GET"]
paths = ["/timesheets/**"]
""",
        )
        sidecars.append(marketing)
        payroll.ready(), marketing.ready()

        print("\n== the payroll agent (no keys; plain HTTP to its sidecar)")
        _print_calls(
            "payroll",
            _run_agent(
                payroll.port,
                [
                    "GET http://hr-api/timesheets/2026-11",
                    'POST http://bank-api/payments {"employee": "ada", "amount": 4200}',
                    "DELETE http://hr-api/timesheets/2026-11",
                    "GET http://exfil.example/upload",
                ],
            ),
        )
        print("\n== the marketing agent (a valid SVID, but HR does not admit it)")
        _print_calls(
            "marketing", _run_agent(marketing.port, ["GET http://hr-api/timesheets/2026-11"])
        )
        print("\n== what the HR API was told about its caller (set by HR's sidecar)")
        for xfcc in hr_api.seen:  # type: ignore[attr-defined]
            print(f"   X-Forwarded-Client-Cert: {xfcc}")
        print("\n== brownfield: a bank API on plain HTTPS + OAuth 2.0; the agent holds no token")
        run_brownfield_leg(Path("certs"), scratch=root / "certs")
    finally:
        for sidecar in reversed(sidecars):
            sidecar.stop()
        hr_api.shutdown()
        bank_api.shutdown()

    print("\n== audit trail (one JSON record per decision; summarised)")
    rows = []
    for sidecar in sidecars:
        records = [json.loads(line) for line in sidecar.audit.read_text().splitlines()]
        rows += summary_rows(sidecar.name, records)
    for line in summary_table(rows, shutil.get_terminal_size((120, 24)).columns):
        print(line)
    if os.environ.get("AGENT_PROXY_DEMO_KEEP") is None:
        shutil.rmtree(root)
    else:
        print(f"\n(kept {root})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
