"""W3C trace context through an HTTP listener with span export off (the
default): the upstream continues the caller's trace under our span, and
the request's records carry its ids."""

from __future__ import annotations

import trio

from tests.integration.http_support import inbound_env
from tests.pki import TestCA

PAYROLL = "spiffe://a.org/agent/payroll"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
RULES = [{"name": "reads", "peers": [PAYROLL], "methods": ["GET"], "paths": ["/timesheets/**"]}]


async def test_trace_context_passes_through_with_export_off(ca_a: TestCA) -> None:
    async with trio.open_nursery() as nursery:
        env = await inbound_env(
            nursery, ca_a.issue("spiffe://a.org/svc/hr"), ca_a, ca_a.issue(PAYROLL), RULES
        )
        traced = await env.exchange(
            b"GET /timesheets/1 HTTP/1.1\r\nHost: hr\r\n"
            + f"traceparent: 00-{TRACE}-00f067aa0ba902b7-01\r\n".encode()
            + b"tracestate: vendor=opaque\r\nConnection: close\r\n\r\n"
        )
        untraced = await env.exchange(
            b"GET /timesheets/2 HTTP/1.1\r\nHost: hr\r\n"
            b"traceparent: 00-not-a-trace-01\r\nConnection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert traced[0] == untraced[0] == 200
    first, second = env.backend.seen
    [parent] = first.header("traceparent")
    _, trace_id, span_id, flags = parent.split("-")
    assert (trace_id, flags) == (TRACE, "01") and span_id != "00f067aa0ba902b7"
    assert first.header("tracestate") == ["vendor=opaque"]
    records = {r["path"]: r for r in env.requests()}
    assert records["/timesheets/1"]["trace_id"] == TRACE
    assert records["/timesheets/1"]["span_id"] == span_id
    # An invalid traceparent is never passed on: a new trace starts here.
    [fresh] = second.header("traceparent")
    assert fresh.split("-")[1] == records["/timesheets/2"]["trace_id"] != TRACE
