"""Traces: W3C trace context (pure) and span export over OTLP/HTTP."""

from proxy.tracing.context import (
    TraceContext,
    incoming,
    new_trace,
    outgoing,
    parse_traceparent,
    parse_tracestate,
)
from proxy.tracing.export import Span, Tracer, span_attributes
from proxy.tracing.settings import TracingSettings, parse_tracing

__all__ = [
    "Span",
    "TraceContext",
    "Tracer",
    "TracingSettings",
    "incoming",
    "new_trace",
    "outgoing",
    "parse_traceparent",
    "parse_tracestate",
    "parse_tracing",
    "span_attributes",
]
