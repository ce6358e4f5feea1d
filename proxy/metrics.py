"""Prometheus metrics for the sidecar, on a private registry.

Theory of operation: one :class:`Metrics` per process owns a private
``CollectorRegistry`` (never the global one, so tests and embedders get
clean, independent instances). The hot-path methods (:meth:`Metrics.connection`,
:meth:`Metrics.request`...) look the labelled child up in a plain dict keyed by
the label tuple, and only on a miss pay for prometheus_client's ``labels()``
(which takes a lock). Label values are bounded: listener names come from the
config, directions and decisions are fixed, reasons are stable snake_case
codes.

The SVID expiry gauge is computed at scrape time from the ``not_after`` set
by :meth:`Metrics.set_svid_not_after`, so it counts down between rotations
and jumps when a rotation swaps the SVID. ``*_created`` series are left out
of the exposition: nobody graphs them and they double the output.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

__all__ = ["DURATION_BUCKETS", "Metrics"]

DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_P = TypeVar("_P", Counter, Gauge, Histogram)


class _Children(Generic[_P]):
    """Labelled children of one metric, cached by label tuple."""

    __slots__ = ("_cache", "_parent")

    def __init__(self, parent: _P) -> None:
        self._parent: _P = parent
        self._cache: dict[tuple[str, ...], _P] = {}

    def get(self, *labels: str) -> _P:
        child = self._cache.get(labels)
        if child is None:
            child = self._parent.labels(*labels)
            self._cache[labels] = child
        return child


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _SvidExpiry:
    """``agent_proxy_svid_expiry_seconds``, computed when scraped."""

    def __init__(self, clock: Callable[[], _dt.datetime]) -> None:
        self.not_after: _dt.datetime | None = None
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "agent_proxy_svid_expiry_seconds",
            "Seconds until our current X509-SVID expires (negative once expired).",
        )
        if self.not_after is not None:
            family.add_metric([], (self.not_after - self._clock()).total_seconds())
        yield family


class _WithoutCreated:
    """The registry's metrics minus the ``*_created`` samples."""

    def __init__(self, registry: _Collector) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            # collect() builds fresh Metric objects on every call; trimming them is safe.
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class Metrics:
    """All of the sidecar's metrics; cheap to update, rendered on scrape."""

    CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, *, clock: Callable[[], _dt.datetime] = _utcnow) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        traffic: Sequence[str] = ("listener", "direction", "decision", "reason")
        self._connections = _Children(
            Counter(
                "agent_proxy_connections_total",
                "Connections by listener, direction, decision and reason.",
                traffic,
                registry=reg,
            )
        )
        self._active = _Children(
            Gauge(
                "agent_proxy_connections_active",
                "Connections open now.",
                ("listener",),
                registry=reg,
            )
        )
        self._requests = _Children(
            Counter(
                "agent_proxy_requests_total",
                "HTTP requests by listener, direction, decision and reason.",
                traffic,
                registry=reg,
            )
        )
        self._handshake_failures = _Children(
            Counter(
                "agent_proxy_handshake_failures_total",
                "TLS handshakes that failed, by reason.",
                ("listener", "reason"),
                registry=reg,
            )
        )
        self._bytes = _Children(
            Counter(
                "agent_proxy_bytes_total",
                "Bytes relayed: up is toward the target, down is back.",
                ("listener", "direction"),
                registry=reg,
            )
        )
        self._duration = _Children(
            Histogram(
                "agent_proxy_request_duration_seconds",
                "HTTP request duration, from the request head to the end of the response.",
                ("listener",),
                buckets=DURATION_BUCKETS,
                registry=reg,
            )
        )
        self._identity_reloads = _Children(
            Counter(
                "agent_proxy_identity_reloads_total",
                "SVID/bundle updates applied (ok) or refused (error).",
                ("result",),
                registry=reg,
            )
        )
        self._config_reloads = _Children(
            Counter(
                "agent_proxy_config_reloads_total",
                "Configuration reloads applied (ok) or refused (error).",
                ("result",),
                registry=reg,
            )
        )
        self._expiry = _SvidExpiry(clock)
        reg.register(self._expiry)
        self._exposition = _WithoutCreated(reg)

    # -- hot path ---------------------------------------------------------

    def connection(self, listener: str, direction: str, decision: str, reason: str) -> None:
        self._connections.get(listener, direction, decision, reason).inc()

    def request(
        self,
        listener: str,
        direction: str,
        decision: str,
        reason: str,
        duration_s: float | None = None,
        bytes_up: int = 0,
        bytes_down: int = 0,
    ) -> None:
        self._requests.get(listener, direction, decision, reason).inc()
        if duration_s is not None:
            self._duration.get(listener).observe(duration_s)
        self.transferred(listener, bytes_up, bytes_down)

    def transferred(self, listener: str, bytes_up: int, bytes_down: int) -> None:
        """Bytes relayed outside of :meth:`request` (TCP-mode connections)."""
        if bytes_up:
            self._bytes.get(listener, "up").inc(bytes_up)
        if bytes_down:
            self._bytes.get(listener, "down").inc(bytes_down)

    def handshake_failure(self, listener: str, reason: str) -> None:
        self._handshake_failures.get(listener, reason).inc()

    def active(self, listener: str, delta: int) -> None:
        self._active.get(listener).inc(delta)

    # -- identity and config ------------------------------------------------

    def set_svid_not_after(self, not_after: _dt.datetime | None) -> None:
        """Our current SVID's expiry (call on every rotation; None: no SVID)."""
        self._expiry.not_after = not_after

    def identity_reload(self, result: str) -> None:
        self._identity_reloads.get(result).inc()

    def config_reload(self, result: str) -> None:
        self._config_reloads.get(result).inc()

    # -- exposition -----------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format 0.0.4 (:attr:`CONTENT_TYPE`)."""
        return generate_latest(self._exposition)
