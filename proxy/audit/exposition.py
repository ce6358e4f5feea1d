"""The sink's own metrics, on the sidecar's private Prometheus registry.

``register(metrics, sink)`` (or a ``CollectorRegistry``) adds a collector
read at scrape time: no work on the hot path, and proxy/metrics.py needs no
change. prometheus_client is imported at scrape time, as metrics does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from proxy.audit.sink import AuditSink


class Registers(Protocol):
    """Where collectors go: proxy.metrics.Metrics, or a CollectorRegistry."""

    def register(self, collector: Collector) -> None: ...


class AuditCollector:
    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sink = self.sink
        errors = CounterMetricFamily(
            "agent_proxy_audit_errors", "Audit writes that failed (ENOSPC, EIO, file removed...)."
        )
        errors.add_metric([], sink.errors)
        dropped = CounterMetricFamily(
            "agent_proxy_audit_dropped_records",
            'Audit records dropped (on_failure = "open", or the pending cap reached).',
        )
        dropped.add_metric([], sink.dropped)
        written = CounterMetricFamily(
            "agent_proxy_audit_records", "Audit records written to the trail."
        )
        written.add_metric([], sink.records_written)
        healthy = GaugeMetricFamily(
            "agent_proxy_audit_healthy", "1 while the audit sink can write, 0 while it cannot."
        )
        healthy.add_metric([], 1.0 if sink.healthy else 0.0)
        return (errors, dropped, written, healthy)


def register(registry: Registers, sink: AuditSink) -> None:
    registry.register(AuditCollector(sink))
