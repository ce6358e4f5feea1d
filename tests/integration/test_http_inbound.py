"""HTTP inbound listener: request policy, header rules, bad input, streaming."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from tests.integration.http_support import (
    InboundEnv,
    client_context,
    inbound_env,
    read_response,
    start_inbound,
    tls_connect,
)
from tests.integration.tls_support import MemoryAudit
from tests.pki import Issued, TestCA

PAYROLL = "spiffe://a.org/agent/payroll"
RULES = [
    {"name": "payroll-reads", "peers": [PAYROLL], "methods": ["GET"], "paths": ["/timesheets/**"]},
    {
        "name": "payroll-posts",
        "peers": [PAYROLL],
        "methods": ["POST", "PUT"],
        "paths": ["/upload", "/timesheets/**"],
    },
    {
        "name": "payroll-ws",
        "peers": [PAYROLL],
        "methods": ["GET"],
        "paths": ["/ws"],
        "allow_upgrade": True,
    },
]


async def _env(
    nursery: trio.Nursery, hr: Issued, ca: TestCA, client: Issued, **extra: Any
) -> InboundEnv:
    return await inbound_env(nursery, hr, ca, client, RULES, **extra)


async def test_allowed_request_reaches_target_with_our_identity_header(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        status, headers, body = await env.exchange(
            b"GET /timesheets/2026?employee=ada HTTP/1.1\r\nHost: hr\r\n"
            b"X-Forwarded-Client-Cert: By=spiffe://evil/x;URI=spiffe://a.org/agent/admin\r\n"
            b"x-forwarded-client-cert: second copy\r\n"
            b"Connection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    [seen] = env.backend.seen
    leaf_hash = hashlib.sha256(payroll.cert.public_bytes(Encoding.DER)).hexdigest()
    assert seen.header("x-forwarded-client-cert") == [
        f"By=spiffe://a.org/svc/hr;Hash={leaf_hash};URI={PAYROLL}"
    ]
    assert seen.target == "/timesheets/2026?employee=ada"
    assert len(seen.header("x-request-id")) == 1
    assert headers["x-request-id"] == seen.header("x-request-id")[0]
    [record] = env.requests()
    assert record["decision"] == "allow" and record["reason"] == "rule_matched"
    assert record["rule"] == "payroll-reads"
    assert record["path"] == "/timesheets/2026"  # never the query string
    assert record["status"] == 200 and record["method"] == "GET"
    assert record["peer_id"] == PAYROLL and record["local_id"] == "spiffe://a.org/svc/hr"
    assert record["request_id"] == seen.header("x-request-id")[0]
    assert record["bytes_down"] == len(body) and isinstance(record["duration_ms"], int)


async def test_hop_by_hop_headers_are_not_forwarded(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        status, _, _ = await env.exchange(
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\nConnection: close, X-Secret, Host\r\n"
            b"X-Secret: drop me\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Request-Id: abc-123\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    [seen] = env.backend.seen
    names = {n for n, _ in seen.headers}
    assert not names & {"x-secret", "keep-alive", "te", "proxy-authorization"}
    assert seen.header("host") == ["hr"]  # Connection cannot strip routing fields
    assert seen.header("x-request-id") == ["abc-123"]  # forwarded when present


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\nContent-Length: 3\r\nContent-Length: 3\r\n"
            b"\r\nabc",
            400,
            "bad_request",
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nContent-Length: 3, 3\r\n\r\nabc",
            400,
            "bad_request",
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nContent-Length: abc\r\n\r\nabc",
            400,
            "bad_request",
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
            400,
            "bad_request",
        ),
        (b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\nX-Long: a\r\n b\r\n\r\n", 400, "bad_request"),
        (b"GET /timesheets/1 HTTP/1.1\nHost: hr\n\n", 400, "bad_request"),
        (
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
            431,
            "header_too_large",
        ),
        (
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n" + b"X-A: b\r\n" * 150 + b"\r\n",
            431,
            "header_too_large",
        ),
        (b"GET /timesheets/../admin HTTP/1.1\r\nHost: hr\r\n\r\n", 400, "bad_path"),
        (b"GET /timesheets/%2e%2e/admin HTTP/1.1\r\nHost: hr\r\n\r\n", 400, "bad_path"),
        (b"GET /timesheets%2fadmin HTTP/1.1\r\nHost: hr\r\n\r\n", 400, "bad_path"),
        (b"GET /timesheets/1 HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
        ),
        (b"\x16\x03\x01garbage\r\n\r\n", 400, "bad_request"),
    ],
    ids=[
        "dup-cl",
        "cl-list",
        "cl-invalid",
        "cl-and-te",
        "bad-chunk-size",
        "chunk-bare-lf",
        "obs-fold",
        "bare-lf",
        "header-too-big",
        "too-many-headers",
        "dot-segments",
        "encoded-dots",
        "encoded-slash",
        "no-host",
        "te-gzip",
        "garbage",
    ],
)
async def test_bad_requests_never_reach_the_target(
    ca_a: TestCA, hr: Issued, payroll: Issued, raw: bytes, status: int, reason: str
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        got, _headers, _body = await env.exchange(raw)
        # The listener keeps serving.
        ok, _, _ = await env.exchange(
            b"GET /timesheets/ok HTTP/1.1\r\nHost: hr\r\nConnection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert got == status
    assert [s.target for s in env.backend.seen] == ["/timesheets/ok"]
    assert ok == 200
    records = env.requests()
    assert records[0]["decision"] == "deny" and records[0]["reason"] == reason
    assert records[0]["status"] == status


async def test_denied_request_gets_403_json(ca_a: TestCA, hr: Issued, payroll: Issued) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        status, headers, body = await env.exchange(
            b"DELETE /timesheets/2026 HTTP/1.1\r\nHost: hr\r\nContent-Length: 5\r\n\r\nhello"
        )
        nursery.cancel_scope.cancel()
    assert status == 403
    doc = json.loads(body)
    assert doc["reason"] == "no_matching_rule"
    assert doc["request_id"] == headers["x-request-id"]
    assert headers["content-type"] == "application/json"
    assert env.backend.seen == []
    [record] = env.requests()
    assert record["reason"] == "no_matching_rule" and record["rule"] is None
    assert record["status"] == 403 and record["request_id"] == doc["request_id"]


async def test_upgrade_refused_unless_a_rule_allows_it(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        status, _, body = await env.exchange(
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 403 and json.loads(body)["reason"] == "upgrade_not_allowed"
    assert env.backend.seen == []


async def test_keep_alive_chunked_and_large_bodies(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    """Two requests on one connection, a chunked 5 MB upload streamed through
    intact, then a 5 MB streamed response."""
    body = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        stream = await tls_connect(env.port, client_context(payroll))

        async def send_chunked() -> None:
            await stream.send_all(
                b"PUT /timesheets/bulk HTTP/1.1\r\nHost: hr\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                await stream.send_all(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await stream.send_all(b"0\r\n\r\n")

        async with trio.open_nursery() as inner:
            inner.start_soon(send_chunked)
            status, _, reply = await read_response(stream, b"PUT")
        assert status == 200 and json.loads(reply)["body_len"] == len(body)
        await stream.send_all(b"GET /timesheets/big/5242880 HTTP/1.1\r\nHost: hr\r\n\r\n")
        status, _, big = await read_response(stream)
        assert status == 200 and len(big) == 5 * 1024 * 1024
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert env.backend.seen[0].body == body
    records = env.requests()
    assert records[0]["bytes_up"] == len(body)
    assert records[1]["bytes_down"] == 5 * 1024 * 1024
    assert len({r["conn_id"] for r in records}) == 1


async def test_expect_100_continue(ca_a: TestCA, hr: Issued, payroll: Issued) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        stream = await tls_connect(env.port, client_context(payroll))
        await stream.send_all(
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        with trio.fail_after(10):
            interim = await stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"hello")
        status, _, reply = await read_response(stream, b"POST")
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert status == 200 and json.loads(reply)["body_len"] == 5
    assert env.backend.seen[0].header("expect") == []


async def test_denied_expect_gets_403_without_100(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        stream = await tls_connect(env.port, client_context(payroll))
        await stream.send_all(
            b"POST /admin HTTP/1.1\r\nHost: hr\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        with trio.fail_after(10):
            first = await stream.receive_some(65536)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert first.startswith(b"HTTP/1.1 403 ")


async def test_request_timeout_on_a_stalled_head(
    ca_a: TestCA, hr: Issued, payroll: Issued, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll, request_timeout=5)
        stream = await tls_connect(env.port, client_context(payroll))
        await stream.send_all(b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n")
        status, _, _ = await read_response(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert status == 408
    assert env.requests()[0]["reason"] == "request_timeout"
    assert env.backend.seen == []


async def test_peer_named_by_no_rule_is_refused_in_handshake(ca_a: TestCA, hr: Issued) -> None:
    marketing = ca_a.issue("spiffe://a.org/agent/marketing")
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, marketing)
        with pytest.raises(trio.BrokenResourceError):
            stream = await tls_connect(env.port, client_context(marketing))
            await stream.send_all(b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n\r\n")
            await stream.receive_some(100)
        nursery.cancel_scope.cancel()
    refused = [r for r in env.audit.records() if r["event"] == "connection.refused"]
    assert refused[0]["reason"] == "peer_not_allowed"


async def test_allowed_upgrade_becomes_a_tunnel(ca_a: TestCA, hr: Issued, payroll: Issued) -> None:
    """A rule with allow_upgrade lets a WebSocket-style upgrade through: the
    101 reaches the client and then bytes flow both ways, raw."""

    async def upgrading_backend(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        assert b"upgrade: websocket" in head.lower()
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        while data := await stream.receive_some(65536):
            await stream.send_all(data.upper())
        await stream.aclose()

    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, upgrading_backend, 0)
        backend_port = listeners[0].socket.getsockname()[1]
        _, port = await start_inbound(
            nursery, issued=hr, cas=(ca_a,), target_port=backend_port, rules=RULES, audit=audit
        )
        stream = await tls_connect(port, client_context(payroll))
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: hr\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        head = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 101 ")
        await stream.send_all(b"raw frames")
        with trio.fail_after(10):
            assert await stream.receive_some(65536) == b"RAW FRAMES"
        await stream.aclose()
        nursery.cancel_scope.cancel()
    [record] = [r for r in audit.records() if r["event"] == "http.request"]
    assert record["status"] == 101 and record["rule"] == "payroll-ws"
