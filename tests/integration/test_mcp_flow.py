"""MCP through an inbound sidecar, against a fixture MCP server that speaks
raw JSON-RPC (JSON or SSE answers): per-call policy, denials in MCP terms,
list filtering, strict parsing and per-call audit records."""

from __future__ import annotations

import json
from typing import Any

import h11
import pytest
import trio

from proxy.config import parse_config
from proxy.identity import IdentityState
from proxy.policy.gate import Gate
from proxy.runtime.http_listeners import HttpInboundListener
from tests.integration.http_support import (
    client_context,
    identity_section,
    serve_h11,
    tls_connect,
)
from tests.integration.tls_support import MemoryAudit, snapshot
from tests.pki import Issued, TestCA

PAYROLL = "spiffe://a.org/agent/payroll"
TOOLS = [
    {"name": n, "inputSchema": {"type": "object"}}
    for n in ("read_timesheet", "issue_payment", "delete_everything")
]
RULES = [
    {"name": "payroll-tools", "peers": [PAYROLL], "tools": ["read_timesheet", "issue_payment"]},
    {
        "name": "payment-cap",
        "peers": [PAYROLL],
        "tools": ["issue_payment"],
        "action": "deny",
        "when": "mcp.args.amount > 10000",
    },
]


class FixtureServer:
    """Answers tools/list and tools/call; SSE when the request says X-Mode: sse."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        await serve_h11(stream, self.respond)

    def respond(self, request: h11.Request, body: bytes) -> tuple[str, bytes]:
        if request.method == b"GET":
            # A replay after Last-Event-ID: an earlier tools/list answer.
            old = json.dumps(
                {"jsonrpc": "2.0", "id": 5, "result": {"tools": TOOLS, "nextCursor": "p2"}}
            )
            return "text/event-stream", f"id: 41\ndata: {old}\n\n".encode()
        msg = json.loads(body)
        self.calls.append(msg)
        if msg["method"] == "tools/list":
            result: Any = {"tools": TOOLS, "nextCursor": "page-2"}
        else:
            result = {"content": [{"type": "text", "text": "done"}]}
        answer = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result})
        if dict(request.headers).get(b"x-mode") == b"sse":
            note = json.dumps(
                {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
            )
            return (
                "text/event-stream",
                f"event: message\ndata: {note}\n\nid: 7\ndata: {answer}\n\n".encode(),
            )
        return "application/json", answer.encode()


@pytest.fixture
def hr(ca_a: TestCA) -> Issued:
    return ca_a.issue("spiffe://a.org/svc/hr-mcp")


async def _post(
    port: int,
    client: Issued,
    message: Any,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    body = raw if raw is not None else json.dumps(message).encode()
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in {
            "Host": "hr",
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(headers or {}),
        }.items()
    )
    stream = await tls_connect(port, client_context(client))
    await stream.send_all(f"POST /mcp HTTP/1.1\r\n{head}\r\n".encode() + body)
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    head_raw, _, payload = data.partition(b"\r\n\r\n")
    lines = head_raw.decode().split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if hdrs.get("transfer-encoding") == "chunked":
        out, rest = b"", payload
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        payload = out
    return int(lines[0].split()[1]), hdrs, payload


async def _setup(
    nursery: trio.Nursery, hr: Issued, ca: TestCA, rules: list[dict[str, Any]] = RULES
) -> tuple[int, FixtureServer, MemoryAudit]:
    server = FixtureServer()
    listeners = await nursery.start(trio.serve_tcp, server.handle, 0)
    server.port = listeners[0].socket.getsockname()[1]
    config = parse_config(
        {
            "identity": identity_section(),
            "inbound": [
                {
                    "name": "hr-mcp",
                    "listen": "127.0.0.1:0",
                    "protocol": "mcp",
                    "target": f"127.0.0.1:{server.port}",
                    "rules": rules,
                }
            ],
        }
    )
    audit = MemoryAudit()
    listener = HttpInboundListener(
        config.inbound[0], IdentityState(snapshot(hr, ca)), audit.sink, Gate(config.guard)
    )
    bound = await nursery.start(listener.serve, nursery)
    return int(bound[0].rpartition(":")[2]), server, audit


def _call(i: Any, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {"name": tool, "arguments": args},
    }


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_tools_list_is_filtered(ca_a: TestCA, hr: Issued, mode: str) -> None:
    async with trio.open_nursery() as nursery:
        port, _server, _ = await _setup(nursery, hr, ca_a)
        status, _headers, body = await _post(
            port,
            ca_a.issue(PAYROLL),
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"X-Mode": mode},
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    if mode == "json":
        doc = json.loads(body)
    else:
        events = body.decode().split("\n\n")
        # The progress notification passes byte for byte; only the answer changes.
        assert events[0].startswith('event: message\ndata: {"jsonrpc": "2.0", "method"')
        assert events[1].startswith("id: 7\ndata: ")
        doc = json.loads(events[1].split("data: ", 1)[1])
    names = [t["name"] for t in doc["result"]["tools"]]
    assert names == ["read_timesheet", "issue_payment"]
    assert doc["result"]["nextCursor"] == "page-2"
    assert doc["id"] == 1


async def test_hidden_tool_is_unknown_and_never_reaches_the_server(
    ca_a: TestCA, hr: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        port, server, audit = await _setup(nursery, hr, ca_a)
        status, _, body = await _post(
            port, ca_a.issue(PAYROLL), _call("7", "delete_everything", {})
        )
        nursery.cancel_scope.cancel()
    doc = json.loads(body)
    assert status == 200  # never 403/404: MCP clients misread those
    assert doc["id"] == "7"  # the id keeps its JSON type
    assert doc["error"]["code"] == -32602 and "Unknown tool" in doc["error"]["message"]
    assert server.calls == []
    [call] = [r for r in audit.records() if r["event"] == "mcp.call"]
    assert call["tool"] == "delete_everything" and call["decision"] == "deny"


async def test_forbidden_argument_never_reaches_the_server(ca_a: TestCA, hr: Issued) -> None:
    async with trio.open_nursery() as nursery:
        port, server, audit = await _setup(nursery, hr, ca_a)
        client = ca_a.issue(PAYROLL)
        denied = await _post(port, client, _call(3, "issue_payment", {"amount": 50000}))
        allowed = await _post(port, client, _call(4, "issue_payment", {"amount": 4200}))
        nursery.cancel_scope.cancel()
    doc = json.loads(denied[2])
    assert doc["result"]["isError"] is True and "denied_by_rule" in json.dumps(doc)
    assert json.loads(allowed[2])["result"]["content"][0]["text"] == "done"
    assert [c["params"]["arguments"]["amount"] for c in server.calls] == [4200]
    calls = [r for r in audit.records() if r["event"] == "mcp.call"]
    assert [c["decision"] for c in calls] == ["deny", "allow"]
    assert calls[0]["rule"] == "payment-cap" and calls[1]["rule"] == "payroll-tools"
    assert len(calls[0]["args_sha256"]) == 64 and calls[0]["protocol_version"]
    requests = [r for r in audit.records() if r["event"] == "http.request"]
    assert [(r["decision"], r["rule"]) for r in requests] == [
        ("deny", "payment-cap"),
        ("allow", "payroll-tools"),
    ]

    # Argument values are never logged: no record holds the amounts as
    # values (hex ids and hashes may contain the digits by chance).
    def values(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return [v for item in node.values() for v in values(item)]
        if isinstance(node, list):
            return [v for item in node for v in values(item)]
        return [node]

    logged = values(audit.records())
    assert 50000 not in logged and 4200 not in logged and "amount" not in json.dumps(logged)


@pytest.mark.parametrize(
    ("raw", "headers", "status", "code"),
    [
        (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/list"}', {}, 400, -32600),
        (b"{not json", {}, 400, -32700),
        (
            b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]',
            {"MCP-Protocol-Version": "2025-06-18"},
            400,
            -32600,
        ),
    ],
    ids=["duplicate-keys", "invalid-json", "batch-after-2025-03-26"],
)
async def test_strict_json_rpc(
    ca_a: TestCA, hr: Issued, raw: bytes, headers: dict[str, str], status: int, code: int
) -> None:
    async with trio.open_nursery() as nursery:
        port, server, _ = await _setup(nursery, hr, ca_a)
        got, _, body = await _post(port, ca_a.issue(PAYROLL), None, headers, raw=raw)
        nursery.cancel_scope.cancel()
    assert got == status
    assert json.loads(body)["error"]["code"] in (code, -32700, -32600)
    assert server.calls == []


async def test_2026_mirrored_headers_must_match(ca_a: TestCA, hr: Issued) -> None:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
    message = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {"name": "read_timesheet", "arguments": {}, "_meta": meta},
    }
    async with trio.open_nursery() as nursery:
        port, server, audit = await _setup(nursery, hr, ca_a)
        client = ca_a.issue(PAYROLL)
        base = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call"}
        bad = await _post(port, client, message, {**base, "Mcp-Name": "issue_payment"})
        good = await _post(port, client, message, {**base, "Mcp-Name": "read_timesheet"})
        nursery.cancel_scope.cancel()
    assert bad[0] == 400 and json.loads(bad[2])["error"]["code"] == -32020
    assert good[0] == 200 and len(server.calls) == 1
    refused = next(r for r in audit.records() if r["event"] == "mcp.call")
    assert refused["reason"] == "mcp_header_mismatch" and refused["tool"] == "read_timesheet"
    answered = next(r for r in audit.records() if r["event"] == "http.request")
    assert answered["bytes_up"] > 0 and answered["bytes_down"] == len(bad[2])


async def test_replayed_list_on_get_is_filtered_too(ca_a: TestCA, hr: Issued) -> None:
    async with trio.open_nursery() as nursery:
        port, _server, _ = await _setup(nursery, hr, ca_a)
        stream = await tls_connect(port, client_context(ca_a.issue(PAYROLL)))
        await stream.send_all(
            b"GET /mcp HTTP/1.1\r\nHost: hr\r\nAccept: text/event-stream\r\n"
            b"Last-Event-ID: 40\r\nConnection: close\r\n\r\n"
        )
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
        await stream.aclose()
        nursery.cancel_scope.cancel()
    body = data.partition(b"\r\n\r\n")[2].decode()
    assert "id: 41" in body
    doc = json.loads(body.split("data: ", 1)[1].split("\n")[0])
    assert [t["name"] for t in doc["result"]["tools"]] == ["read_timesheet", "issue_payment"]
    assert doc["result"]["nextCursor"] == "p2"


def test_forwarded_bodies_share_one_allowed_verdict_per_reason_and_rule() -> None:
    # hooked_request reuses allowed verdicts (they are immutable); each must
    # still say exactly the reason, rule and policy version it was asked for.
    from proxy.http import hooked

    first = hooked._allowed("rule_matched", "a", "")
    assert (first.allowed, first.reason, first.rule) == (True, "rule_matched", "a")
    assert first.status == 200 and first.headers == () and first.audit_fields() == {}
    assert hooked._allowed("rule_matched", "a", "") is first
    assert hooked._allowed("rule_matched", "b", "").rule == "b"
    assert hooked._allowed("dry_run", "a", "").reason == "dry_run"
    reloaded = hooked._allowed("rule_matched", "a", "sha256:v2")
    assert reloaded is not first and reloaded.audit_fields() == {"policy_version": "sha256:v2"}
    for i in range(2000):  # bounded: reloads with new rule names cannot grow it
        hooked._allowed("rule_matched", f"r{i}", "")
    assert len(hooked._ALLOWED) <= 1024
    assert hooked._allowed("rule_matched", "a", "").rule == "a"


async def test_the_request_record_of_a_forwarded_call_names_its_policy_version(
    ca_a: TestCA, hr: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        port, _server, audit = await _setup(nursery, hr, ca_a)
        status, _, _ = await _post(port, ca_a.issue(PAYROLL), _call(1, "read_timesheet", {}))
        nursery.cancel_scope.cancel()
    assert status == 200
    records = {r["event"]: r for r in audit.records()}
    version = records["mcp.call"]["policy_version"]
    assert version.startswith("sha256:")
    assert records["http.request"]["policy_version"] == version


async def test_an_allowed_call_carries_its_rate_quota_as_plain_http_does(
    ca_a: TestCA, hr: Issued
) -> None:
    """RFC 9110 fields of our own (RateLimit, RateLimit-Policy) reach the
    client on every answer of a rate-limited rule: the forwarded ones too,
    not only our refusal."""
    rules = [
        {"name": "pay-tools", "peers": [PAYROLL], "tools": ["read_timesheet"], "rate": "2/minute"}
    ]
    async with trio.open_nursery() as nursery:
        port, server, _ = await _setup(nursery, hr, ca_a, rules)
        payroll = ca_a.issue(PAYROLL)
        results = [await _post(port, payroll, _call(i, "read_timesheet", {})) for i in range(3)]
        nursery.cancel_scope.cancel()
    assert ["error" in json.loads(body) for _, _, body in results] == [False, False, True]
    for status, headers, _ in results:
        assert status == 200
        assert headers["ratelimit-policy"] == '"pay-tools";q=2;w=60'
        assert headers["ratelimit"].startswith('"pay-tools";r=')
    assert "retry-after" in results[2][1]
    assert len(server.calls) == 2
