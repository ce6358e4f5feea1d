"""A2A through an inbound sidecar against a fixture A2A server (JSON-RPC
shapes from a2a-sdk's types): method policy for both name generations, task
ownership, push URL allowlists, and the Agent Card passed through intact."""

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
MARKETING = "spiffe://a.org/agent/marketing"
CARD = b'{"name":"hr-agent","signatures":[{"protected":"eyJhbGciOiJFUzI1NiJ9","signature":"c2ln"}]}'
RULES = [
    {
        "name": "agents-talk",
        "peers": [PAYROLL, MARKETING],
        # v0.3 and v1.0 spellings mix freely: both normalise to the v1.0 names.
        "a2a_methods": ["message/send", "GetTask", "tasks/pushNotificationConfig/set"],
        "push_url_allowlist": ["https://hooks.payroll.example/*"],
    },
    {
        "name": "agent-card",
        "peers": [PAYROLL, MARKETING],
        "methods": ["GET"],
        "paths": ["/.well-known/**"],
    },
]


class A2aServer:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.tasks = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        await serve_h11(stream, self.respond)

    def respond(self, request: h11.Request, body: bytes) -> tuple[str, bytes]:
        if request.method == b"GET":
            return "application/json", CARD
        msg = json.loads(body)
        self.seen.append(msg)
        if msg["method"] in ("message/send", "SendMessage"):
            self.tasks += 1
            result: Any = {
                "kind": "task",
                "id": f"task-{self.tasks}",
                "contextId": "ctx",
                "status": {"state": "submitted"},
            }
        else:
            result = {"ok": True}
        return "application/json", json.dumps(
            {"jsonrpc": "2.0", "id": msg["id"], "result": result}
        ).encode()


@pytest.fixture
def hr(ca_a: TestCA) -> Issued:
    return ca_a.issue("spiffe://a.org/svc/hr-agent")


async def _rpc(
    port: int, client: Issued, method: str, params: dict[str, Any], rid: int = 1
) -> dict[str, Any]:
    body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()
    stream = await tls_connect(port, client_context(client))
    await stream.send_all(
        b"POST / HTTP/1.1\r\nHost: hr\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    return dict(json.loads(data.partition(b"\r\n\r\n")[2]))


async def _setup(
    nursery: trio.Nursery, hr: Issued, ca: TestCA
) -> tuple[int, A2aServer, MemoryAudit]:
    server = A2aServer()
    listeners = await nursery.start(trio.serve_tcp, server.handle, 0)
    config = parse_config(
        {
            "identity": identity_section(),
            "inbound": [
                {
                    "name": "hr-agent",
                    "listen": "127.0.0.1:0",
                    "protocol": "a2a",
                    "target": f"127.0.0.1:{listeners[0].socket.getsockname()[1]}",
                    "rules": RULES,
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


MESSAGE = {
    "message": {"role": "user", "messageId": "m1", "parts": [{"kind": "text", "text": "hi"}]}
}


async def test_method_policy_covers_both_name_generations(ca_a: TestCA, hr: Issued) -> None:
    async with trio.open_nursery() as nursery:
        port, server, audit = await _setup(nursery, hr, ca_a)
        payroll = ca_a.issue(PAYROLL)
        v03 = await _rpc(port, payroll, "message/send", MESSAGE)
        v10 = await _rpc(port, payroll, "SendMessage", MESSAGE)
        cancel = await _rpc(port, payroll, "tasks/cancel", {"id": "task-1"})
        unknown = await _rpc(port, payroll, "tasks/explode", {})
        nursery.cancel_scope.cancel()
    assert v03["result"]["id"] == "task-1" and v10["result"]["id"] == "task-2"
    assert cancel["error"]["message"] and "result" not in cancel
    assert unknown["error"]["code"] == -32601
    assert [m["method"] for m in server.seen] == ["message/send", "SendMessage"]
    calls = [r for r in audit.records() if r["event"] == "mcp.call"]
    assert [c["a2a_method"] for c in calls[:3]] == ["SendMessage", "SendMessage", "CancelTask"]
    # A forwarded call's http.request record names the policy version, as
    # its mcp.call record and a plain request's record do.
    forwarded = [
        r for r in audit.records() if r["event"] == "http.request" and r["decision"] == "allow"
    ]
    assert len(forwarded) == 2
    assert all(r["policy_version"] == calls[0]["policy_version"] for r in forwarded)


async def test_a_task_belongs_to_the_identity_that_created_it(ca_a: TestCA, hr: Issued) -> None:
    async with trio.open_nursery() as nursery:
        port, server, _ = await _setup(nursery, hr, ca_a)
        payroll, marketing = ca_a.issue(PAYROLL), ca_a.issue(MARKETING)
        created = await _rpc(port, payroll, "message/send", MESSAGE)
        task_id = created["result"]["id"]
        own = await _rpc(port, payroll, "tasks/get", {"id": task_id})
        other = await _rpc(port, marketing, "GetTask", {"id": task_id})
        nobody = await _rpc(port, marketing, "GetTask", {"id": "task-404"})
        nursery.cancel_scope.cancel()
    assert own["result"] == {"ok": True}
    assert other["error"]["code"] == -32001  # "not found", same as a task that does not exist
    assert nobody["error"] == other["error"]
    assert [m["method"] for m in server.seen] == ["message/send", "tasks/get"]


async def test_push_notification_urls_must_be_allowlisted(ca_a: TestCA, hr: Issued) -> None:
    async with trio.open_nursery() as nursery:
        port, server, _ = await _setup(nursery, hr, ca_a)
        payroll = ca_a.issue(PAYROLL)
        task_id = (await _rpc(port, payroll, "message/send", MESSAGE))["result"]["id"]

        def push(url: str) -> dict[str, Any]:
            return {"taskId": task_id, "pushNotificationConfig": {"url": url}}

        ok = await _rpc(
            port,
            payroll,
            "tasks/pushNotificationConfig/set",
            push("https://hooks.payroll.example/done"),
        )
        evil = await _rpc(
            port, payroll, "tasks/pushNotificationConfig/set", push("https://exfil.example/done")
        )
        nursery.cancel_scope.cancel()
    assert ok["result"] == {"ok": True}
    assert "push_url_not_allowed" in json.dumps(evil["error"])
    assert len(server.seen) == 2


async def test_signed_agent_card_is_never_rewritten(ca_a: TestCA, hr: Issued) -> None:
    async with trio.open_nursery() as nursery:
        port, _, _ = await _setup(nursery, hr, ca_a)
        stream = await tls_connect(port, client_context(ca_a.issue(PAYROLL)))
        await stream.send_all(
            b"GET /.well-known/agent-card.json HTTP/1.1\r\nHost: hr\r\nConnection: close\r\n\r\n"
        )
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert data.partition(b"\r\n\r\n")[2] == CARD


def test_unknown_a2a_method_in_a_rule_is_a_load_error() -> None:
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"rules\[0\]\.a2a_methods\[0\]: unknown A2A method"):
        parse_config(
            {
                "identity": identity_section(),
                "inbound": [
                    {
                        "name": "a",
                        "listen": "127.0.0.1:0",
                        "protocol": "a2a",
                        "target": "127.0.0.1:9",
                        "rules": [{"peers": [PAYROLL], "a2a_methods": ["tasks/explode"]}],
                    }
                ],
            }
        )
