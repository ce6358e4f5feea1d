"""Spans for the sidecar's requests, exported with the OpenTelemetry SDK.

Theory of operation: the HTTP code calls :meth:`Tracer.start_span` when a
request's decision starts (with the caller's trace context, or none: then a
new trace starts) and :meth:`Tracer.end_span` when its record is emitted.
The span's ids go into the audit record and the ``traceparent`` we forward,
so the trail and the traces name the same spans.

Export never sits on a request's path: ``end_span`` appends to a bounded
queue under an uncontended lock; one daemon thread sends batches over
OTLP/HTTP (protobuf). A full queue or a failed export (collector down, slow,
refusing) drops spans and counts them (``dropped``); requests never wait.
With tracing off (no ``otlp_endpoint``) ids are still made, so audit records
carry a trace id either way, and the SDK is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.errors import UsageError
from proxy.tracing.context import TraceContext, new_trace
from proxy.tracing.settings import TracingSettings

log = structlog.get_logger("agent_proxy.tracing")

Attributes = Mapping[str, str | int | bool]
INSTALL_HINT = (
    "tracing.otlp_endpoint needs the OpenTelemetry SDK: "
    "pip install 'agent-mtls-proxy[otel]' "
    "(opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http)"
)


@dataclass
class Span:
    context: TraceContext
    parent_span_id: str | None
    otel: Any = field(default=None, repr=False)


class Tracer:
    def __init__(self, settings: TracingSettings | None = None) -> None:
        self.settings = settings or TracingSettings()
        self._batcher: Any = None
        self._tracer: Any = None
        url = self.settings.traces_url
        if url is not None:
            self._start_sdk(url)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @property
    def dropped(self) -> int:
        return 0 if self._batcher is None else int(self._batcher.dropped)

    @property
    def exported(self) -> int:
        return 0 if self._batcher is None else int(self._batcher.exported)

    def _start_sdk(self, url: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError:
            raise UsageError(INSTALL_HINT) from None
        from proxy.tracing.batch import Batcher

        s = self.settings
        exporter = OTLPSpanExporter(endpoint=url, timeout=s.timeout)
        self._batcher = Batcher(exporter, s.max_queue, s.batch_size, s.schedule_delay)
        # A private provider: never the global one, so embedders and tests
        # get independent instances.
        provider = TracerProvider(resource=Resource.create({"service.name": s.service_name}))
        provider.add_span_processor(self._batcher)
        self._provider = provider
        self._tracer = provider.get_tracer("agent-proxy")

    def start_span(
        self,
        name: str,
        *,
        server: bool,
        parent: TraceContext | None,
        attributes: Attributes | None = None,
    ) -> Span:
        if self._tracer is None:
            ctx = parent.child() if parent is not None else new_trace()
            return Span(ctx, parent.span_id if parent is not None else None)
        from opentelemetry import trace as api

        otel_parent = None
        if parent is not None:
            remote = api.SpanContext(
                int(parent.trace_id, 16),
                int(parent.span_id, 16),
                is_remote=True,
                trace_flags=api.TraceFlags(parent.flags),
                trace_state=api.TraceState(list(parent.tracestate)),
            )
            otel_parent = api.set_span_in_context(api.NonRecordingSpan(remote))
        kind = api.SpanKind.SERVER if server else api.SpanKind.CLIENT
        otel = self._tracer.start_span(
            name, context=otel_parent, kind=kind, attributes=dict(attributes or {})
        )
        made = otel.get_span_context()
        ctx = TraceContext(
            f"{made.trace_id:032x}",
            f"{made.span_id:016x}",
            int(made.trace_flags),
            parent.tracestate if parent is not None else (),
        )
        return Span(ctx, parent.span_id if parent is not None else None, otel)

    def end_span(
        self, span: Span, *, attributes: Attributes | None = None, error: str | None = None
    ) -> None:
        if span.otel is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if attributes:
            span.otel.set_attributes(dict(attributes))
        if error is not None:
            span.otel.set_status(Status(StatusCode.ERROR, error))
        span.otel.end()

    def shutdown(self) -> None:
        """Send what is queued (bounded by the export timeout), then stop."""
        if self._batcher is not None:
            self._batcher.shutdown()


def span_attributes(record: Mapping[str, Any]) -> dict[str, str | int | bool]:
    """The attributes a request's span carries, from its audit record."""
    names: Sequence[tuple[str, str]] = (
        ("peer_id", "spiffe.peer_id"),
        ("local_id", "spiffe.local_id"),
        ("rule", "agent_proxy.rule"),
        ("decision", "agent_proxy.decision"),
        ("reason", "agent_proxy.reason"),
        ("method", "http.request.method"),
        ("path", "url.path"),
        ("status", "http.response.status_code"),
        ("tool", "mcp.tool"),
        ("mcp_method", "mcp.method"),
        ("a2a_method", "a2a.method"),
    )
    out: dict[str, str | int | bool] = {}
    for key, attribute in names:
        value = record.get(key)
        if isinstance(value, str | int | bool) and value != "":
            out[attribute] = value
    return out


class TracingCollector:
    """``agent_proxy_trace_spans_{exported,dropped}_total`` at scrape time."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        exported = CounterMetricFamily(
            "agent_proxy_trace_spans_exported", "Spans accepted by the OTLP collector."
        )
        exported.add_metric([], self.tracer.exported)
        dropped = CounterMetricFamily(
            "agent_proxy_trace_spans_dropped",
            "Spans dropped: export queue full, or the collector down or refusing.",
        )
        dropped.add_metric([], self.tracer.dropped)
        return (exported, dropped)
