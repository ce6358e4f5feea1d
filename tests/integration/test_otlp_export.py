"""Span export over OTLP/HTTP to a collector stand-in: a real HTTP server
in the test that decodes the protobuf ``ExportTraceServiceRequest``."""

from __future__ import annotations

import http.server
import queue
import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from proxy.tracing import Tracer, TracingSettings, incoming, span_attributes
from tests.support import DEADLINE, free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Collector(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: queue.Queue[tuple[str, object]] = queue.Queue()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.server.spans.put((service, span))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def attrs(span: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:  # type: ignore[attr-defined]
        value = a.value
        out[a.key] = value.string_value if value.HasField("string_value") else value.int_value
    return out


def test_spans_of_both_sidecars_reach_the_collector(collector: Collector) -> None:
    """The egress sidecar continues the client's trace, the inbound sidecar
    continues the egress's: one trace id, parent links, attributes."""
    egress = Tracer(
        TracingSettings(
            otlp_endpoint=collector.endpoint, service_name="payroll", schedule_delay=0.05
        )
    )
    inbound = Tracer(
        TracingSettings(otlp_endpoint=collector.endpoint, service_name="hr", schedule_delay=0.05)
    )
    client = incoming([(b"traceparent", f"00-{TRACE}-{CALLER_SPAN}-01".encode())])
    out_span = egress.start_span("GET /timesheets/**", server=False, parent=client)
    # What the egress forwards is what the inbound sidecar reads.
    forwarded = incoming([(b"traceparent", out_span.context.traceparent().encode())])
    in_span = inbound.start_span("GET /timesheets/**", server=True, parent=forwarded)
    record = {
        "peer_id": "spiffe://payroll.example/agent/payroll",
        "local_id": "spiffe://payroll.example/svc/hr",
        "rule": "payroll-reads-timesheets",
        "decision": "allow",
        "method": "GET",
        "path": "/timesheets/7",
        "status": 200,
    }
    inbound.end_span(in_span, attributes=span_attributes(record))
    egress.end_span(out_span, attributes=span_attributes({**record, "peer_id": record["local_id"]}))
    got = {}
    for _ in range(2):
        service, span = collector.spans.get(timeout=DEADLINE)
        got[service] = span
    egress.shutdown()
    inbound.shutdown()
    assert {s.trace_id.hex() for s in got.values()} == {TRACE}  # type: ignore[attr-defined]
    assert got["payroll"].parent_span_id.hex() == CALLER_SPAN  # type: ignore[attr-defined]
    assert got["hr"].parent_span_id.hex() == out_span.context.span_id  # type: ignore[attr-defined]
    assert got["hr"].span_id.hex() == in_span.context.span_id  # type: ignore[attr-defined]
    assert attrs(got["hr"])["spiffe.peer_id"] == "spiffe://payroll.example/agent/payroll"
    assert attrs(got["hr"])["agent_proxy.rule"] == "payroll-reads-timesheets"
    assert attrs(got["hr"])["http.response.status_code"] == 200
    assert egress.exported == 1 and egress.dropped == 0


def test_a_collector_that_is_down_drops_and_counts(collector: Collector) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    tracer = Tracer(
        TracingSettings(otlp_endpoint=down, timeout=0.5, max_queue=3, schedule_delay=0.05)
    )
    for _ in range(10):
        # end_span only queues: never waits for the collector.
        tracer.end_span(tracer.start_span("GET /x", server=True, parent=None))
    tracer.shutdown()
    assert tracer.exported == 0
    assert tracer.dropped == 10


def test_without_an_endpoint_ids_are_still_made() -> None:
    tracer = Tracer()
    assert not tracer.enabled
    parent = incoming([(b"traceparent", f"00-{TRACE}-{CALLER_SPAN}-01".encode())])
    span = tracer.start_span("GET /", server=True, parent=parent)
    assert span.context.trace_id == TRACE and span.parent_span_id == CALLER_SPAN
    tracer.end_span(span)


def test_without_the_sdk_enabling_tracing_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from proxy.errors import UsageError

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'agent-mtls-proxy\[otel\]'"):
        Tracer(TracingSettings(otlp_endpoint="http://127.0.0.1:4318"))


def test_drops_are_exposed_as_metrics() -> None:
    from proxy.metrics import Metrics
    from proxy.tracing.export import TracingCollector

    tracer = Tracer(
        TracingSettings(otlp_endpoint=f"http://127.0.0.1:{free_port()}", timeout=0.2, max_queue=1)
    )
    for _ in range(3):
        tracer.end_span(tracer.start_span("GET /", server=True, parent=None))
    tracer.shutdown()
    metrics = Metrics()
    metrics.registry.register(TracingCollector(tracer))  # type: ignore[arg-type]
    assert "agent_proxy_trace_spans_dropped_total 3.0" in metrics.render().decode()
