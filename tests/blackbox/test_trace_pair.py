"""Black-box: one agent action followed across the egress sidecar, the
inbound sidecar and the backend by its W3C trace id, in the audit trails of
both sidecars and in the spans an OTLP/HTTP collector stand-in receives."""

from __future__ import annotations

import http.server
import queue
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from tests.otlp_support import Collector, attrs
from tests.pki import TestCA
from tests.support import DEADLINE, ProxyProcess, free_port

PAYROLL = "spiffe://a.org/agent/payroll"
HR = "spiffe://a.org/svc/hr"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class _Backend(http.server.BaseHTTPRequestHandler):
    """Answers 200 and hands the trace headers it got to the test."""

    protocol_version = "HTTP/1.1"
    server: _BackendServer

    def do_GET(self) -> None:
        self.server.seen.put(
            (self.headers.get_all("traceparent") or [], self.headers.get_all("tracestate") or [])
        )
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


class _BackendServer(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Backend)
        self.seen: queue.Queue[tuple[list[str], list[str]]] = queue.Queue()


def _identity(tmp: Path, ca: TestCA, name: str, spiffe_id: str) -> str:
    d = tmp / name
    ca.issue(spiffe_id).write(d, ca.bundle_pem())
    return (
        f'[identity]\nsource = "files"\ncert = "{d}/svid.pem"\nkey = "{d}/svid_key.pem"\n'
        f'bundle = "{d}/bundle.pem"\n[admin]\nlisten = "127.0.0.1:0"\n'
    )


def _tracing(endpoint: str, service: str) -> str:
    return (
        f'[tracing]\notlp_endpoint = "{endpoint}"\nservice_name = "{service}"\n'
        'schedule_delay = "50ms"\ntimeout = "500ms"\nmax_queue = 4\n'
    )


def _egress(tmp: Path, ca: TestCA, hr_port: int, tracing: str) -> ProxyProcess:
    path = tmp / f"payroll-{len(list(tmp.iterdir()))}.toml"
    path.write_text(
        _identity(tmp, ca, "payroll", PAYROLL)
        + tracing
        + f"""
[[outbound]]
name = "egress"
listen = "127.0.0.1:0"
protocol = "http-proxy"
[[outbound.routes]]
name = "hr"
host = "hr-api"
target = "127.0.0.1:{hr_port}"
expect = ["{HR}"]
methods = ["GET"]
paths = ["/timesheets/**"]
"""
    )
    return ProxyProcess(["run", "--config", str(path)])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca_a: TestCA) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("trace")
    backend = _BackendServer()
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    with Collector() as collector:
        hr_config = tmp / "hr.toml"
        hr_config.write_text(
            _identity(tmp, ca_a, "hr", HR)
            + _tracing(collector.endpoint, "hr")
            + f"""
[[inbound]]
name = "hr-api"
listen = "127.0.0.1:0"
target = "127.0.0.1:{backend.server_address[1]}"
protocol = "http"
[[inbound.rules]]
name = "payroll-reads-timesheets"
peers = ["{PAYROLL}"]
methods = ["GET"]
paths = ["/timesheets/**"]
"""
        )
        hr = ProxyProcess(["run", "--config", str(hr_config)])
        payroll = None
        try:
            hr_port = hr.wait_listener("hr-api")[1]
            payroll = _egress(tmp, ca_a, hr_port, _tracing(collector.endpoint, "payroll"))
            yield {
                "tmp": tmp,
                "hr": hr,
                "hr_port": hr_port,
                "payroll": payroll,
                "proxy": f"http://127.0.0.1:{payroll.wait_listener('egress')[1]}",
                "backend": backend,
                "collector": collector,
            }
        finally:
            if payroll is not None:
                payroll.stop()
            hr.stop()
            backend.shutdown()
            backend.server_close()


def _get(proxy: str, url: str, headers: dict[str, str] | None = None) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    request = urllib.request.Request(url, headers=headers or {})
    with opener.open(request, timeout=DEADLINE) as response:
        response.read()
        return int(response.status)


def test_a_client_trace_reaches_the_backend_the_trails_and_the_collector(
    world: dict[str, Any],
) -> None:
    traceparent = f"00-{TRACE}-{CLIENT_SPAN}-01"
    status = _get(
        world["proxy"],
        "http://hr-api/timesheets/2026",
        {"traceparent": traceparent, "tracestate": "vendor=opaque"},
    )
    assert status == 200

    # The backend gets the same trace, one traceparent, parented by the
    # inbound sidecar's span (never the client's header passed through).
    parents, states = world["backend"].seen.get(timeout=DEADLINE)
    assert len(parents) == 1
    version, trace_id, backend_parent, flags = parents[0].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert backend_parent != CLIENT_SPAN
    assert states == ["vendor=opaque"]

    egress = world["payroll"].audit.wait_json(event="http.request", path="/timesheets/2026")
    inbound = world["hr"].audit.wait_json(event="http.request", path="/timesheets/2026")
    assert egress["trace_id"] == inbound["trace_id"] == TRACE
    assert inbound["span_id"] == backend_parent

    spans = dict(world["collector"].next_spans(2))
    assert {span.trace_id.hex() for span in spans.values()} == {TRACE}
    out_span, in_span = spans["payroll"], spans["hr"]
    assert out_span.parent_span_id.hex() == CLIENT_SPAN
    assert out_span.span_id.hex() == egress["span_id"]
    assert in_span.parent_span_id.hex() == egress["span_id"]
    assert in_span.span_id.hex() == inbound["span_id"]
    assert out_span.kind == out_span.SPAN_KIND_CLIENT
    assert in_span.kind == in_span.SPAN_KIND_SERVER
    hr_attrs, payroll_attrs = attrs(in_span), attrs(out_span)
    assert hr_attrs["spiffe.peer_id"] == PAYROLL
    assert hr_attrs["spiffe.local_id"] == HR
    assert hr_attrs["agent_proxy.rule"] == "payroll-reads-timesheets"
    assert hr_attrs["agent_proxy.decision"] == "allow"
    assert payroll_attrs["spiffe.peer_id"] == HR
    assert payroll_attrs["spiffe.local_id"] == PAYROLL


def test_without_a_client_trace_the_egress_starts_one(world: dict[str, Any]) -> None:
    assert _get(world["proxy"], "http://hr-api/timesheets/new") == 200
    parents, _ = world["backend"].seen.get(timeout=DEADLINE)
    trace_id = parents[0].split("-")[1]
    egress = world["payroll"].audit.wait_json(event="http.request", path="/timesheets/new")
    inbound = world["hr"].audit.wait_json(event="http.request", path="/timesheets/new")
    assert egress["trace_id"] == inbound["trace_id"] == trace_id != TRACE
    spans = dict(world["collector"].next_spans(2))
    assert spans["payroll"].parent_span_id == b""  # the root of the new trace


def test_a_collector_that_is_down_fails_no_request_and_drops_are_counted(
    world: dict[str, Any], ca_a: TestCA
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    egress = _egress(world["tmp"], ca_a, world["hr_port"], _tracing(down, "payroll"))
    try:
        proxy = f"http://127.0.0.1:{egress.wait_listener('egress')[1]}"
        for i in range(12):
            assert _get(proxy, f"http://hr-api/timesheets/{i}") == 200
            egress.audit.wait_json(event="http.request", path=f"/timesheets/{i}")
        admin = egress.wait_listener("admin")
        # No collector: every export fails, its spans are dropped and counted.
        line = egress.logs.wait_json(event="span export failing; dropping spans")
        assert line["dropped"] >= 1
        text = urllib.request.urlopen(
            f"http://{admin[0]}:{admin[1]}/metrics", timeout=DEADLINE
        ).read()
        dropped = next(
            float(row.split()[-1])
            for row in text.decode().splitlines()
            if row.startswith("agent_proxy_trace_spans_dropped_total")
        )
        assert dropped >= line["dropped"]
        assert b"agent_proxy_trace_spans_exported_total 0.0" in text
    finally:
        egress.stop()
    # The backend saw those requests too: drain them for the other tests.
    for _ in range(12):
        world["backend"].seen.get(timeout=DEADLINE)
