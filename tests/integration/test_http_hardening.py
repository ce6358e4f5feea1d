"""HTTP inbound: what probing found (issue 12) stays fixed.

HEAD under a GET rule, underscore spellings of our headers, request
trailers, the judged path being the forwarded one, invalid request ids,
client resets, heads sent a byte at a time, stalled readers, the audit
``outcome`` field and reason phrases.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from tests.integration.http_support import (
    InboundEnv,
    RecordingBackend,
    inbound_env,
    read_response,
    start_inbound,
    start_outbound,
)
from tests.integration.tls_support import MemoryAudit
from tests.pki import Issued, TestCA

PAYROLL = "spiffe://a.org/agent/payroll"
HR = "spiffe://a.org/svc/hr"
RULES = [
    {"name": "reads", "peers": [PAYROLL], "methods": ["GET"], "paths": ["/timesheets/**"]},
    {"name": "uploads", "peers": [PAYROLL], "methods": ["POST"], "paths": ["/upload"]},
]


@pytest.fixture
def hr(ca_a: TestCA) -> Issued:
    return ca_a.issue(HR)


async def _env(
    nursery: trio.Nursery, hr: Issued, ca: TestCA, client: Issued, **extra: Any
) -> InboundEnv:
    return await inbound_env(nursery, hr, ca, client, RULES, **extra)


# -- 9: HEAD ------------------------------------------------------------------


async def test_a_get_rule_allows_head_and_the_answer_has_no_body(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        stream = await env.connect()
        await stream.send_all(b"HEAD /timesheets/1 HTTP/1.1\r\nHost: hr\r\n\r\n")
        allowed = await read_response(stream, b"HEAD")
        # A refused HEAD gets its status without the JSON body, and the
        # connection stays usable: nothing was left half-written.
        await stream.send_all(b"HEAD /admin HTTP/1.1\r\nHost: hr\r\n\r\n")
        denied = await read_response(stream, b"HEAD")
        await stream.send_all(
            b"GET /timesheets/2 HTTP/1.1\r\nHost: hr\r\nConnection: close\r\n\r\n"
        )
        after = await read_response(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert allowed[0] == 200 and allowed[2] == b""
    assert denied[0] == 403 and denied[2] == b""
    assert after[0] == 200
    assert [(s.method, s.target) for s in env.backend.seen] == [
        ("HEAD", "/timesheets/1"),
        ("GET", "/timesheets/2"),
    ]
    records = env.events("http.request")
    assert records[0]["rule"] == "reads" and records[0]["method"] == "HEAD"


# -- 19, 22: header rules -----------------------------------------------------


async def test_underscore_spellings_of_our_headers_are_stripped(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(
            nursery, hr, ca_a, payroll, identity_headers=["X-Forwarded-Client-Cert", "X-Spiffe-Id"]
        )
        status, _, _ = await env.exchange(
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n"
            b"X_Forwarded_Client_Cert: By=spiffe://evil/x;URI=spiffe://a.org/agent/admin\r\n"
            b"X_Spiffe_Id: spiffe://a.org/agent/admin\r\nx-spiffe_id: again\r\n"
            b"Transfer_Encoding: chunked\r\nX_Other: kept\r\nConnection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    [seen] = env.backend.seen
    folded = {n.replace("_", "-") for n, _ in seen.headers}
    assert "x-spiffe-id" not in folded and "transfer-encoding" not in folded
    assert len(seen.header("x-forwarded-client-cert")) == 1
    assert seen.header("x-forwarded-client-cert")[0].endswith(f"URI={PAYROLL}")
    assert seen.header("x_other") == ["kept"]


async def test_an_invalid_request_id_is_replaced_not_doubled(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        status, headers, _ = await env.exchange(
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\nX-Request-Id: abc def\r\n"
            b"Connection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    [seen] = env.backend.seen
    [ours] = seen.header("x-request-id")
    assert ours != "abc def" and headers["x-request-id"] == ours
    assert env.events("http.request")[0]["request_id"] == ours


# -- 20: trailers ---------------------------------------------------------------


async def test_request_trailers_get_the_header_rules(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll, identity_headers=["X-Spiffe-Id"])
        status, _, _ = await env.exchange(
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\n"
            b"X-Forwarded-Client-Cert: By=x;URI=spiffe://a.org/agent/admin\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nX_Spiffe_Id: forged\r\n"
            b"X-Request-Id: other\r\nHost: elsewhere\r\nX-Checksum: abc\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    [seen] = env.backend.seen
    assert seen.body == b"hello"
    assert seen.trailers == [("x-checksum", "abc")]


# -- 21: the judged path is the forwarded path ----------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/timesheets/x#/../../admin",
        b"/timesheets/..;/admin",
        b"/timesheets/.;x/1",
        b"/timesheets/%2e%2e;jsessionid=1/admin",
        b"http://hr/timesheets/x#frag",
    ],
    ids=["fragment", "dotdot-params", "dot-params", "encoded-dotdot-params", "absolute-fragment"],
)
async def test_targets_that_could_be_read_two_ways_are_400(
    ca_a: TestCA, hr: Issued, payroll: Issued, target: bytes
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        status, _, _ = await env.exchange(b"GET " + target + b" HTTP/1.1\r\nHost: hr\r\n\r\n")
        nursery.cancel_scope.cancel()
    assert status == 400
    assert env.backend.seen == []
    [record] = env.events("http.request")
    assert record["reason"] == "bad_path" and record["outcome"] == "client_error"


async def test_the_backend_gets_the_normalised_target_policy_judged(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        status, _, _ = await env.exchange(
            b"GET /timesheets/%61%62c/%7e?q=%2e%2e HTTP/1.1\r\nHost: hr\r\n"
            b"Connection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert status == 200
    [seen] = env.backend.seen
    assert seen.target == "/timesheets/abc/~?q=%2e%2e"
    assert env.events("http.request")[0]["path"] == "/timesheets/abc/~"


# -- 23: a client reset ---------------------------------------------------------


async def test_a_client_reset_while_idle_is_one_close_record(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            env = await _env(nursery, hr, ca_a, payroll)
            stream = await env.connect()
            await stream.send_all(b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n\r\n")
            status, _, _ = await read_response(stream)
            # SO_LINGER 0: close() sends RST instead of FIN.
            raw = stream.transport_stream.socket
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            close = await env.wait_for("connection.close")
            nursery.cancel_scope.cancel()
    assert status == 200
    assert [r["reason"] for r in env.events("connection.close")] == ["client_reset"]
    assert close["decision"] == "allow"
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


# -- 24: a head one byte per TLS record -------------------------------------------


async def test_a_head_sent_one_byte_per_record_is_served(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    head = (
        b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n"
        + b"X-Pad: "
        + b"p" * 4000
        + b"\r\nConnection: close\r\n\r\n"
    )
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        stream = await env.connect()
        for i in range(len(head)):
            await stream.send_all(head[i : i + 1])  # one TLS record each
        status, _, _ = await read_response(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert status == 200
    assert env.backend.seen[0].header("x-pad") == ["p" * 4000]


# -- 29: a client that stops reading --------------------------------------------


async def test_a_client_that_stops_reading_is_cut_after_the_write_timeout(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll, write_timeout="1s")
        stream = await env.connect()
        await stream.send_all(b"GET /timesheets/big/400000000 HTTP/1.1\r\nHost: hr\r\n\r\n")
        # ...and never read: the proxy's sends stall once the buffers fill.
        close = await env.wait_for("connection.close", deadline=30)
        nursery.cancel_scope.cancel()
    assert close["reason"] == "write_timeout"
    [record] = env.events("http.request")
    assert record["reason"] == "write_timeout" and record["outcome"] == "client_error"
    assert record["decision"] == "allow"  # policy allowed it; the client failed it
    assert record["bytes_down"] < 400_000_000


# -- 4: outcome next to decision ----------------------------------------------


async def test_outcome_says_what_happened(ca_a: TestCA, hr: Issued, payroll: Issued) -> None:
    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        await env.exchange(b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n\r\n")
        await env.exchange(b"GET /admin HTTP/1.1\r\nHost: hr\r\n\r\n")
        await env.exchange(b"GET /timesheets/1 HTTP/1.1\r\n\r\n")
        # A target that is gone.
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        audit = MemoryAudit()
        _, port = await start_inbound(
            nursery, issued=hr, cas=(ca_a,), target_port=dead_port, rules=RULES, audit=audit
        )
        gone = InboundEnv(env.backend, port, audit, payroll)
        status, _, _ = await gone.exchange(b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n\r\n")
        nursery.cancel_scope.cancel()
    assert status == 502
    got = [(r["decision"], r["outcome"]) for r in env.events("http.request")]
    assert got == [("allow", "served"), ("deny", "denied"), ("deny", "client_error")]
    [failed] = gone.events("http.request")
    assert failed["outcome"] == "upstream_error" and failed["reason"] == "target_unreachable"


async def test_outcome_names_an_upstream_that_refused_our_identity(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    backend = RecordingBackend()
    async with trio.open_nursery() as nursery:
        await backend.start(nursery)
        _, in_port = await start_inbound(
            nursery,
            issued=hr,
            cas=(ca_a,),
            target_port=backend.port,
            audit=MemoryAudit(),
            rules=[{"peers": ["spiffe://a.org/agent/other"], "methods": ["GET"], "paths": ["/**"]}],
        )
        out_audit = MemoryAudit()
        _, port = await start_outbound(
            nursery,
            issued=payroll,
            cas=(ca_a,),
            protocol="http",
            audit=out_audit,
            routes=[
                {
                    "target": f"127.0.0.1:{in_port}",
                    "expect": [HR],
                    "methods": ["GET"],
                    "paths": ["/**"],
                }
            ],
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /x HTTP/1.1\r\nHost: hr\r\nConnection: close\r\n\r\n")
        status, _, _ = await read_response(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert status == 502
    [record] = [r for r in out_audit.records() if r["event"] == "http.request"]
    assert record["reason"] == "upstream_refused" and record["outcome"] == "refused_by_upstream"
    assert record["decision"] == "allow"  # our policy allowed it
    assert backend.seen == []


# -- 7b: reason phrases ------------------------------------------------------


async def test_status_lines_we_write_carry_a_reason_phrase(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async def first_line(stream: trio.abc.Stream) -> bytes:
        data = b""
        with trio.fail_after(10):
            while b"\r\n" not in data:
                data += await stream.receive_some(1)
        return data

    async with trio.open_nursery() as nursery:
        env = await _env(nursery, hr, ca_a, payroll)
        stream = await env.connect()
        await stream.send_all(
            b"POST /upload HTTP/1.1\r\nHost: hr\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        continue_line = await first_line(stream)
        await stream.aclose()
        stream = await env.connect()
        await stream.send_all(b"GET /admin HTTP/1.1\r\nHost: hr\r\nConnection: close\r\n\r\n")
        forbidden_line = await first_line(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert continue_line == b"HTTP/1.1 100 Continue\r\n"
    assert forbidden_line == b"HTTP/1.1 403 Forbidden\r\n"
