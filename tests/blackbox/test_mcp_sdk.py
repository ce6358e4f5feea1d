"""Black-box: the official MCP Python SDK (``mcp`` on PyPI) through a pair of
``agent-proxy run`` sidecars.

Topology (everything on 127.0.0.1)::

    SDK client (subprocess, HTTP_PROXY=egress)  -- http://hr-mcp-{json,sse}/mcp
      -> payroll's egress sidecar  ([[outbound]] protocol = "http-proxy")
      -> mTLS
      -> HR's inbound sidecar      ([[inbound]] protocol = "mcp", judges every call)
      -> SDK MCPServer (uvicorn in a thread, streamable HTTP at /mcp)

Two MCP servers run side by side: one with ``json_response=True`` (every
answer is ``application/json``) and one with ``json_response=False`` (the
SDK's default: ``text/event-stream``). Each is driven by the SDK client in
the legacy handshake era (``initialize``, 2025-11-25) and in the stateless
2026-07-28 era (no handshake; every request mirrors its version, method and
target name into ``MCP-Protocol-Version``, ``Mcp-Method`` and ``Mcp-Name``).

The egress routes are ``protocol = "http"`` (GET/POST/DELETE on ``/mcp``):
config also accepts ``protocol = "mcp"`` on a route, but then the egress side
judges tools too and, with no ``tools`` key, an unscoped route grants no
``tools/call`` at all. Keeping the egress at the HTTP layer means every MCP
decision asserted below is the inbound (HR) sidecar's.

Policy on HR's side, for the payroll agent: ``read_timesheet`` always,
``issue_payment`` only when ``mcp.args.amount <= 10000``; the server's third
tool, ``delete_everything``, is granted to nobody, so it is hidden from
``tools/list`` and answered as an unknown tool.

mcp 2.x notes: ``FastMCP`` is now ``mcp.server.mcpserver.MCPServer``, and a
JSON-RPC error reaches the caller as ``mcp.MCPError`` (v1's ``McpError``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from tests.pki import TestCA
from tests.support import DEADLINE, ProxyProcess

PAYROLL = "spiffe://a.org/agent/payroll"
HR = "spiffe://a.org/svc/hr"
TOOLS = ("read_timesheet", "issue_payment", "delete_everything")
ALLOWED = ["read_timesheet", "issue_payment"]
MODERN = "2026-07-28"
LEGACY = "legacy"
# Argument values that must never show up in an audit record.
EMPLOYEE = "Zoe Quux-7731"
BIG_AMOUNT = 50000
SMALL_AMOUNT = 4321


# -- the MCP server -----------------------------------------------------------------


class _Recorder:
    """ASGI wrapper: every HTTP exchange the server saw (request head and body,
    response status and content type), and an event once the app is started."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.exchanges: list[dict[str, Any]] = []
        self.started = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":

            async def lifespan_send(message: Any) -> None:
                if message["type"] == "lifespan.startup.complete":
                    self.started.set()
                await send(message)

            await self.app(scope, receive, lifespan_send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            "body": b"",
            "status": None,
            "content_type": "",
            "response": b"",  # the server's answer, before any sidecar touched it
        }
        self.exchanges.append(entry)

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                entry["body"] += message.get("body", b"")
            return message

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                entry["content_type"] = headers.get(b"content-type", b"").decode("latin-1")
            elif message["type"] == "http.response.body" and len(entry["response"]) < 65536:
                entry["response"] += message.get("body", b"")
            await send(message)

        await self.app(scope, recording_receive, recording_send)

    def rpc(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(JSON-RPC message, exchange) for every POSTed message the server got."""
        out: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for ex in list(self.exchanges):
            if ex["method"] != "POST" or not ex["body"]:
                continue
            doc = json.loads(ex["body"])
            for msg in doc if isinstance(doc, list) else [doc]:
                out.append((msg, ex))
        return out


class HrMcpServer:
    """The SDK's MCPServer with three tools, served by uvicorn on a thread."""

    def __init__(self, host: str, *, json_response: bool) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []  # tool invocations, server-side
        mcp = MCPServer("hr")

        @mcp.tool()
        async def read_timesheet(employee: str, ctx: Context) -> str:
            """A timesheet. Reports progress, so an SSE server answers it as a stream."""
            self.calls.append(("read_timesheet", {"employee": employee}))
            await ctx.report_progress(1, 2, "reading")
            return f"timesheet of {employee}: 40h"

        @mcp.tool()
        def issue_payment(employee: str, amount: int) -> str:
            self.calls.append(("issue_payment", {"employee": employee, "amount": amount}))
            return f"paid {amount} to {employee}"

        @mcp.tool()
        def delete_everything() -> str:
            self.calls.append(("delete_everything", {}))
            return "deleted everything"

        # DNS-rebinding protection stays on: the Host the client asked the
        # egress proxy for must arrive unchanged, or the SDK answers 421.
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[host, "127.0.0.1:*"],
            allowed_origins=[],
        )
        self.recorder = _Recorder(
            mcp.streamable_http_app(json_response=json_response, transport_security=security)
        )
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.recorder, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
            )
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        if not self.recorder.started.wait(DEADLINE):
            raise TimeoutError("the MCP server did not start")

    def reset(self) -> None:
        self.calls.clear()
        self.recorder.exchanges.clear()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(DEADLINE)
        self.sock.close()


# -- the SDK client (a subprocess behind HTTP_PROXY) -----------------------------------

CLIENT = r"""
import json, sys
import anyio, httpx2
import mcp_types as types
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

url, mode, employee = sys.argv[1], sys.argv[2], sys.argv[3]
big, small = int(sys.argv[4]), int(sys.argv[5])
out = {"exchanges": [], "progress": []}


async def on_response(response):
    exchange = {
        "method": response.request.method,
        "mcp_method": response.request.headers.get("mcp-method"),
        "status": response.status_code,
        "content_type": response.headers.get("content-type", ""),
    }
    out["exchanges"].append(exchange)
    if "event-stream" not in exchange["content_type"]:  # finite: keep it for diagnostics
        await response.aread()
        exchange["body"] = response.content[:2000].decode("utf-8", "replace")


def http_client(rewrite_name=None):
    client = create_mcp_http_client()  # trust_env: HTTP_PROXY applies
    client.event_hooks["response"].append(on_response)
    if rewrite_name is not None:
        async def lie(request):  # a client whose Mcp-Name disagrees with its body
            if request.headers.get("mcp-method") == "tools/call":
                request.headers["mcp-name"] = rewrite_name
        client.event_hooks["request"].append(lie)
    return client


def result_doc(result):
    return {
        "is_error": bool(result.is_error),
        "text": [c.text for c in result.content if getattr(c, "type", "") == "text"],
        "structured": result.structured_content,
    }


async def connect(session):
    if mode == "legacy":
        init = await session.initialize()
        out["initialize_version"] = init.protocol_version
    else:
        session.adopt(types.DiscoverResult(
            supported_versions=[mode], capabilities=types.ServerCapabilities(),
            result_type="complete", ttl_ms=0, cache_scope="public"))
    out["protocol_version"] = session.protocol_version


async def call(session, name, args, **kw):
    try:
        return {"result": result_doc(await session.call_tool(name, args, **kw))}
    except MCPError as exc:
        return {"error": {"code": exc.code, "message": exc.error.message}}


async def main():
    async with http_client() as client, streamable_http_client(url, http_client=client) as (r, w):
        async with ClientSession(r, w) as session:
            await connect(session)
            listed = await session.list_tools()
            out["tools"] = [t.name for t in listed.tools]

            async def progress(p, total, message):
                out["progress"].append([p, total, message])

            out["allowed"] = await call(
                session, "read_timesheet", {"employee": employee}, progress_callback=progress)
            out["hidden"] = await call(session, "delete_everything", {})
            out["forbidden_args"] = await call(
                session, "issue_payment", {"employee": employee, "amount": big})
            out["small_payment"] = await call(
                session, "issue_payment", {"employee": employee, "amount": small})
    if mode != "legacy":
        # The body asks for the hidden tool; the mirrored Mcp-Name claims an allowed one.
        async with http_client("read_timesheet") as client, \
                streamable_http_client(url, http_client=client) as (r, w):
            async with ClientSession(r, w) as session:
                await connect(session)
                out["smuggled"] = await call(session, "delete_everything", {})


try:
    anyio.run(main)
finally:
    print(json.dumps(out))
"""


# -- the sidecars ----------------------------------------------------------------------


def _identity(tmp: Path, ca: TestCA, name: str, spiffe_id: str) -> str:
    d = tmp / name
    ca.issue(spiffe_id).write(d, ca.bundle_pem())
    return (
        f'[identity]\nsource = "files"\ncert = "{d}/svid.pem"\nkey = "{d}/svid_key.pem"\n'
        f'bundle = "{d}/bundle.pem"\n[admin]\nlisten = "127.0.0.1:0"\n'
    )


def _inbound(name: str, port: int) -> str:
    return f"""
[[inbound]]
name = "{name}"
listen = "127.0.0.1:0"
target = "127.0.0.1:{port}"
protocol = "mcp"
[[inbound.rules]]
name = "payroll-reads-timesheets"
peers = ["{PAYROLL}"]
tools = ["read_timesheet"]
[[inbound.rules]]
name = "payroll-pays-up-to-10k"
peers = ["{PAYROLL}"]
tools = ["issue_payment"]
when = "mcp.args.amount <= 10000"
"""


def _route(host: str, port: int) -> str:
    return f"""
[[outbound.routes]]
name = "{host}"
host = "{host}"
target = "127.0.0.1:{port}"
expect = ["{HR}"]
protocol = "http"
methods = ["GET", "POST", "DELETE"]
paths = ["/mcp", "/mcp/**"]
"""


def _start(tmp: Path, name: str, text: str) -> ProxyProcess:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return ProxyProcess(["run", "--config", str(path)])


@dataclass
class Topology:
    servers: dict[str, HrMcpServer]
    hr: ProxyProcess
    payroll: ProxyProcess
    proxy: str
    client_script: Path
    hr_listeners: dict[str, tuple[str, int]]  # server kind -> HR's inbound address
    payroll_identity: Path  # svid.pem, svid_key.pem, bundle.pem


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, ca_a: TestCA) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("mcp-sdk")
    servers = {
        "json": HrMcpServer("hr-mcp-json", json_response=True),
        "sse": HrMcpServer("hr-mcp-sse", json_response=False),
    }
    started: list[Any] = []
    try:
        for server in servers.values():
            server.start()
            started.append(server)
        hr = _start(
            tmp,
            "hr",
            _identity(tmp, ca_a, "hr", HR)
            + "".join(_inbound(f"hr-mcp-{k}", s.port) for k, s in servers.items()),
        )
        started.append(hr)
        listeners = {k: hr.wait_listener(f"hr-mcp-{k}") for k in servers}
        ports = {k: a[1] for k, a in listeners.items()}
        payroll = _start(
            tmp,
            "payroll",
            _identity(tmp, ca_a, "payroll", PAYROLL)
            + '\n[[outbound]]\nname = "egress"\nlisten = "127.0.0.1:0"\n'
            + 'protocol = "http-proxy"\n'
            + "".join(_route(f"hr-mcp-{k}", p) for k, p in ports.items()),
        )
        started.append(payroll)
        egress = payroll.wait_listener("egress")
        script = tmp / "sdk_client.py"
        script.write_text(CLIENT)
        yield Topology(
            servers,
            hr,
            payroll,
            f"http://127.0.0.1:{egress[1]}",
            script,
            listeners,
            tmp / "payroll",
        )
    finally:
        for thing in reversed(started):
            thing.stop()


# -- one SDK client run per (server answer style, protocol era) -------------------------


@dataclass
class Run:
    kind: str
    mode: str
    out: dict[str, Any]
    server: HrMcpServer
    hr_audit: list[dict[str, Any]]
    hr_audit_lines: list[str]
    payroll_audit_lines: list[str]
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _records(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _audit_until(
    proc: ProxyProcess, start: int, done: Callable[[list[dict[str, Any]]], bool]
) -> list[str]:
    """Audit lines after ``start`` once ``done`` holds for their records (deadline)."""
    end = time.monotonic() + DEADLINE
    while True:
        lines = proc.audit.all_lines()[start:]
        if done(_records(lines)):
            return lines
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"audit records incomplete; saw: {lines[-10:]}")
        try:
            proc.audit.wait_for(lambda _line: True, remaining)  # the next line, whatever it is
        except TimeoutError:
            continue


def _decided(records: list[dict[str, Any]], expected: set[tuple[str, str]]) -> bool:
    seen = {(r.get("tool"), r.get("decision")) for r in records if r.get("event") == "mcp.call"}
    return expected <= seen


@pytest.fixture(
    scope="module",
    params=[("json", LEGACY), ("sse", LEGACY), ("json", MODERN), ("sse", MODERN)],
    ids=["json-legacy", "sse-legacy", "json-2026", "sse-2026"],
)
def run(request: pytest.FixtureRequest, topology: Topology) -> Run:
    kind, mode = request.param
    server = topology.servers[kind]
    for s in topology.servers.values():
        s.reset()
    hr_start = len(topology.hr.audit.all_lines())
    payroll_start = len(topology.payroll.audit.all_lines())
    env = {
        **os.environ,
        "HTTP_PROXY": topology.proxy,
        "http_proxy": topology.proxy,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(topology.client_script),
            f"http://hr-mcp-{kind}/mcp",
            mode,
            EMPLOYEE,
            str(BIG_AMOUNT),
            str(SMALL_AMOUNT),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, (
        f"SDK client failed ({kind}, {mode}):\n{proc.stderr[-3000:]}\n"
        f"client saw: {proc.stdout[-6000:]}\n"
        f"HR sidecar audit: {topology.hr.audit.all_lines()[hr_start:][-12:]}\n"
        f"HR sidecar logs: {topology.hr.logs.all_lines()[-5:]}\n"
        f"egress audit: {topology.payroll.audit.all_lines()[payroll_start:][-12:]}\n"
        f"egress logs: {topology.payroll.logs.all_lines()[-5:]}"
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {
        ("read_timesheet", "allow"),
        ("delete_everything", "deny"),
        ("issue_payment", "deny"),
        ("issue_payment", "allow"),
    }

    def hr_done(recs: list[dict[str, Any]]) -> bool:
        smuggle_seen = mode != MODERN or any(r.get("reason") == "mcp_header_mismatch" for r in recs)
        return smuggle_seen and _decided(recs, expected)

    hr_lines = _audit_until(topology.hr, hr_start, hr_done)
    payroll_lines = _audit_until(
        topology.payroll,
        payroll_start,
        lambda recs: sum(r.get("event") == "http.request" for r in recs) >= 5,
    )
    return Run(
        kind,
        mode,
        out,
        server,
        _records(hr_lines),
        hr_lines,
        payroll_lines,
        list(server.calls),
    )


# -- the checks --------------------------------------------------------------------------


def test_negotiated_version(run: Run) -> None:
    if run.mode == LEGACY:
        assert run.out["initialize_version"] == "2025-11-25"
        assert run.out["protocol_version"] == "2025-11-25"
    else:
        assert run.out["protocol_version"] == MODERN


def test_allowed_call_reaches_server(run: Run) -> None:
    allowed = run.out["allowed"]
    assert "result" in allowed, allowed
    assert allowed["result"]["is_error"] is False
    assert allowed["result"]["text"] == [f"timesheet of {EMPLOYEE}: 40h"]
    assert ("read_timesheet", {"employee": EMPLOYEE}) in run.calls
    # On an SSE answer the tool's progress notification rides back through both
    # sidecars; a JSON-response server has nowhere to send it (the SDK drops it,
    # with or without sidecars).
    assert run.out["progress"] == ([[1, 2, "reading"]] if run.kind == "sse" else [])
    small = run.out["small_payment"]
    assert small["result"]["is_error"] is False, small
    assert small["result"]["text"] == [f"paid {SMALL_AMOUNT} to {EMPLOYEE}"]
    assert ("issue_payment", {"employee": EMPLOYEE, "amount": SMALL_AMOUNT}) in run.calls


def test_hidden_tool_missing_from_list(run: Run) -> None:
    assert run.out["tools"] == ALLOWED
    # The server itself listed all three: the sidecar filtered its answer.
    answers = [ex["response"] for m, ex in run.server.recorder.rpc() if m["method"] == "tools/list"]
    assert answers, "tools/list never reached the server"
    for answer in answers:
        assert all(name.encode() in answer for name in TOOLS), answer[:500]


def test_hidden_tool_is_unknown_and_never_reaches_server(run: Run) -> None:
    # The sidecar answers a JSON-RPC error; the SDK raises it as MCPError.
    assert run.out["hidden"] == {
        "error": {"code": -32602, "message": "Unknown tool: delete_everything"}
    }
    assert not [c for c in run.calls if c[0] == "delete_everything"]
    sent = [
        m
        for m, _ in run.server.recorder.rpc()
        if m.get("method") == "tools/call" and m["params"].get("name") == "delete_everything"
    ]
    assert sent == []


def test_forbidden_argument_never_reaches_server(run: Run) -> None:
    refused = run.out["forbidden_args"]
    assert "result" in refused, refused
    assert refused["result"]["is_error"] is True
    (text,) = refused["result"]["text"]
    assert text.startswith("refused by policy"), text
    assert not [c for c in run.calls if c[1].get("amount") == BIG_AMOUNT]
    sent = [
        m
        for m, _ in run.server.recorder.rpc()
        if m.get("method") == "tools/call"
        and (m["params"].get("arguments") or {}).get("amount") == BIG_AMOUNT
    ]
    assert sent == []


def test_answer_content_types(run: Run) -> None:
    """The JSON server answers every POST with JSON; the SSE one streams.

    Legacy-era SSE servers stream every POST answer, so ``tools/list`` (filtered
    event by event) and ``tools/call`` both come back as ``text/event-stream``.
    A 2026-07-28 SSE server answers JSON unless the handler sends something
    first: ``read_timesheet`` reports progress, so that call is a stream.
    """
    posts = [e for e in run.out["exchanges"] if e["method"] == "POST" and e["status"] == 200]
    by_method: dict[str, set[str]] = {}
    for e in posts:
        by_method.setdefault(e["mcp_method"] or "?", set()).add(e["content_type"].split(";")[0])
    server_posts = [
        e for e in run.server.recorder.exchanges if e["method"] == "POST" and e["status"] == 200
    ]
    if run.kind == "json":
        assert all(e["content_type"].startswith("application/json") for e in posts), posts
        assert all(e["content_type"].startswith("application/json") for e in server_posts)
        return
    sse = [e for e in posts if e["content_type"].startswith("text/event-stream")]
    assert sse, f"no SSE answer reached the client: {posts}"
    assert any(e["content_type"].startswith("text/event-stream") for e in server_posts)
    if run.mode == MODERN:
        assert by_method["tools/call"] >= {"text/event-stream"}, by_method
    else:
        # Legacy requests carry no Mcp-Method header: match the server's record.
        list_answers = [
            ex["content_type"]
            for m, ex in run.server.recorder.rpc()
            if m.get("method") == "tools/list"
        ]
        assert list_answers and all(ct.startswith("text/event-stream") for ct in list_answers)


def test_audit_records(run: Run) -> None:
    calls = [r for r in run.hr_audit if r.get("event") == "mcp.call"]
    tool_calls = [r for r in calls if r.get("mcp_method") == "tools/call"]
    assert len(tool_calls) >= 4, calls
    for record in tool_calls:
        for key in ("tool", "decision", "reason", "rule", "args_sha256", "protocol_version"):
            assert key in record, (key, record)
        assert isinstance(record["args_sha256"], str) and len(record["args_sha256"]) >= 64
        expected_version = MODERN if run.mode == MODERN else "2025-11-25"
        assert record["protocol_version"] == expected_version, record
    # The -32020 probe (mirrored header naming another tool) has a record of
    # its own; the policy outcomes below are the other calls'.
    by_tool = {
        (r["tool"], r["decision"]): r for r in tool_calls if r["reason"] != "mcp_header_mismatch"
    }
    assert by_tool[("read_timesheet", "allow")]["rule"] == "payroll-reads-timesheets"
    assert by_tool[("issue_payment", "allow")]["rule"] == "payroll-pays-up-to-10k"
    assert by_tool[("issue_payment", "deny")]["reason"] == "no_matching_rule"
    assert by_tool[("delete_everything", "deny")]["reason"] == "no_matching_rule"
    listed = [r for r in calls if r.get("mcp_method") == "tools/list"]
    assert listed and all(r["decision"] == "allow" for r in listed)


_COUNTERS = ("bytes", "duration", "_ms", "status", "requests")


def _holds_value(value: Any, needle: int) -> bool:
    """Whether a decoded audit record holds ``needle`` (as a number or in a
    string), skipping hex digests and byte/time counters (coincidences)."""
    if isinstance(value, dict):
        return any(
            _holds_value(v, needle)
            for k, v in value.items()
            if not (isinstance(v, int) and any(c in k for c in _COUNTERS))
        )
    if isinstance(value, list):
        return any(_holds_value(v, needle) for v in value)
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == needle
    if isinstance(value, str):
        # Random hex (digests, trace and span ids of 16+ digits) and socket
        # addresses (ephemeral ports) can hold the digits by chance: a span
        # id "c0b5e84321aae54e" once did.
        hexdigest = len(value) >= 16 and all(c in "0123456789abcdef:sha" for c in value)
        return str(needle) in value and not hexdigest and not _ADDRESS.fullmatch(value)
    return False


_ADDRESS = re.compile(r"\[?[0-9a-f.:]+\]?:\d+")


def test_audit_never_holds_argument_values(run: Run) -> None:
    for line in run.hr_audit_lines + run.payroll_audit_lines:
        assert EMPLOYEE not in line, line
        assert not _holds_value(json.loads(line), BIG_AMOUNT), line
        assert not _holds_value(json.loads(line), SMALL_AMOUNT), line


def test_2026_mirrored_headers(run: Run) -> None:
    """2026-07-28: the SDK's mirrored headers pass the sidecar's checks and reach
    the server intact; a client whose Mcp-Name disagrees with its body gets a
    -32020 HeaderMismatch from the sidecar and the call never reaches the server.
    """
    if run.mode != MODERN:
        pytest.skip("mirrored headers are a 2026-07-28 feature; the legacy era has none")
    for msg, ex in run.server.recorder.rpc():
        assert ex["headers"].get("mcp-protocol-version") == MODERN
        assert ex["headers"].get("mcp-method") == msg["method"]
        if msg["method"] == "tools/call":
            assert ex["headers"].get("mcp-name") == msg["params"]["name"]
    smuggled = run.out["smuggled"]
    assert smuggled.get("error", {}).get("code") == -32020, smuggled
    refused = [
        r
        for r in _records(run.hr_audit_lines)
        if r.get("event") == "http.request" and r.get("reason") == "mcp_header_mismatch"
    ]
    assert refused and refused[0]["status"] == 400, refused
    assert not [c for c in run.calls if c[0] == "delete_everything"]


# -- keep-alive after the session's DELETE ------------------------------------------------


def _h11_exchange(tls: ssl.SSLSocket, conn: h11.Connection, method: bytes) -> h11.Response | None:
    """One bodiless request on ``conn``; the response head, or None if the
    connection was closed instead of answered."""
    try:
        tls.sendall(
            conn.send(
                h11.Request(
                    method=method,
                    target="/mcp",
                    headers=[("host", "hr-mcp-json"), ("mcp-session-id", "gone")],
                )
            )
        )
        tls.sendall(conn.send(h11.EndOfMessage()))
        response = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(tls.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.EndOfMessage):
                conn.start_next_cycle()
                return response
            elif isinstance(event, h11.ConnectionClosed):
                return None
    except (h11.RemoteProtocolError, ConnectionError):
        return None  # closed (TLS close_notify or FIN) while we waited for an answer


def test_session_delete_keeps_the_connection_alive(topology: Topology) -> None:
    """The SDK client ends a legacy session with ``DELETE /mcp``. HR's MCP
    listener answers it without ``Connection: close``, so the connection must
    stay usable: the egress pools it and hands it to the next request.

    Found with the SDK runs above: a sidecar that half-closes such a connection
    after the answer makes the *next* client's first request through the egress
    fail with a 502 ``bad_upstream_response`` ("can't handle event type
    ConnectionClosed when role=SERVER and state=SEND_RESPONSE") whenever the
    egress reuses the pooled connection within HR's 2 s linger. Here the same
    thing is checked deterministically on one mTLS connection to HR.
    """
    ident = topology.payroll_identity
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE: the peer's identity is its URI SAN, not a DNS name
    ctx.load_verify_locations(str(ident / "bundle.pem"))
    ctx.load_cert_chain(str(ident / "svid.pem"), str(ident / "svid_key.pem"))
    host, port = topology.hr_listeners["json"]
    with (
        socket.create_connection((host, port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        conn = h11.Connection(h11.CLIENT)
        first = _h11_exchange(tls, conn, b"DELETE")
        assert first is not None and first.status_code == 404  # the SDK: no such session
        assert b"close" not in dict(first.headers).get(b"connection", b"").lower()
        second = _h11_exchange(tls, conn, b"DELETE")
        assert second is not None, (
            "HR's MCP listener closed a keep-alive connection after answering DELETE "
            "without saying Connection: close"
        )
        assert second.status_code == 404
