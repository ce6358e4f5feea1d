"""Prometheus metrics for the sidecar, on a private registry.

Theory of operation: the hot-path methods (:meth:`Metrics.connection`,
:meth:`Metrics.request`...) only add to plain dicts keyed by the label
tuple: no lock and no allocation beyond the first use of a label set. The
sidecar's event loop is one thread, so nothing else writes concurrently;
prometheus_client's own metric objects take a lock on every increment,
which the guide rules out on the hot path. At scrape time a collector turns
the dicts into metric families on a private ``CollectorRegistry`` (never the
global one, so tests and embedders get independent instances). Label values
are bounded: listener names come from the config, directions and decisions
are fixed, reasons are stable snake_case codes.

Identity metrics follow the current snapshot and the identity source:
:meth:`Metrics.watch_identity` subscribes to the state, so
``agent_proxy_svid_expiry_timestamp_seconds`` (our SVID's notAfter as Unix
time, Prometheus' convention for deadlines: alert on ``... - time() < 600``)
moves when a rotation swaps the SVID, and reads the source's counters at
scrape time for ``agent_proxy_identity_reloads_total``, so the metric and
the source's own stats are one number, never two that drift.
"""

from __future__ import annotations

import bisect
import datetime as _dt
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from proxy.identity import IdentitySnapshot, IdentityState

# prometheus_client is imported at scrape time, not here: only the registry
# and the families come from it, the hot path adds to plain dicts, and a
# sidecar should not load it (with its http.server and email modules)
# before its listeners bind, nor at all with the admin endpoint off.
if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

__all__ = ["DURATION_BUCKETS", "Metrics", "ReactorCollector"]

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

Labels = tuple[str, ...]


class _Counter:
    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.values: dict[Labels, float] = {}

    def inc(self, key: Labels, amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def family(self) -> Metric:
        from prometheus_client.core import CounterMetricFamily

        base = self.name.removesuffix("_total")
        out = CounterMetricFamily(base, self.doc, labels=self.labels)
        for key, value in self.values.items():
            out.add_metric(list(key), value)
        return out


class _Gauge(_Counter):
    def family(self) -> Metric:
        from prometheus_client.core import GaugeMetricFamily

        out = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in self.values.items():
            out.add_metric(list(key), value)
        return out


class _Histogram:
    __slots__ = ("buckets", "doc", "labels", "name", "series")

    def __init__(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.buckets = tuple(buckets)
        # per label set: [count per bucket (not cumulative)..., +Inf count], and the sum
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, key: Labels, value: float) -> None:
        entry = self.series.get(key)
        if entry is None:
            entry = ([0] * (len(self.buckets) + 1), [0.0])
            self.series[key] = entry
        counts, total = entry
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def family(self) -> Metric:
        from prometheus_client.core import HistogramMetricFamily

        out = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, (counts, total) in self.series.items():
            running = 0
            cumulative = []
            for bound, count in zip((*map(str, self.buckets), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            out.add_metric(list(key), cumulative, total[0])
        return out


class ReloadCounts(Protocol):
    """What an identity source counts (proxy.sources.SourceStats)."""

    @property
    def reloads_ok(self) -> int: ...

    @property
    def reloads_failed(self) -> int: ...


class _Identity:
    """The SVID expiry timestamp and the identity reload counter."""

    def __init__(self) -> None:
        self.not_after: _dt.datetime | None = None
        self.reloads: ReloadCounts | None = None

    def families(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        expiry = GaugeMetricFamily(
            "agent_proxy_svid_expiry_timestamp_seconds",
            "When our current X509-SVID expires (its notAfter), in Unix time.",
        )
        if self.not_after is not None:
            expiry.add_metric([], self.not_after.timestamp())
        yield expiry
        reloads = CounterMetricFamily(
            "agent_proxy_identity_reloads",
            "SVID/bundle updates swapped in (ok), or refused or failed to fetch (error); "
            "the old identity kept serving on error.",
            labels=["result"],
        )
        if self.reloads is not None:
            reloads.add_metric(["ok"], self.reloads.reloads_ok)
            reloads.add_metric(["error"], self.reloads.reloads_failed)
        yield reloads


class ReactorStats(Protocol):
    """What the process's epoll reactor counts (proxy.runtime.reactor)."""

    def stats(self) -> dict[str, int]: ...


class ReactorCollector:
    """``agent_proxy_reactor_pairs`` (established pairs whose bytes the
    reactor moves now), ``agent_proxy_reactor_buffered_bytes`` (read and
    held for destinations that would block: the memory a slow reader costs)
    and ``agent_proxy_reactor_body_transfers_total`` /
    ``agent_proxy_reactor_body_bytes_total`` (HTTP answer bodies, and their
    bytes, moved socket to socket), read at scrape time; 0 while no reactor
    runs."""

    def __init__(self) -> None:
        self.reactor: ReactorStats | None = None

    def attach(self, reactor: ReactorStats | None) -> None:
        self.reactor = reactor

    # (name, the key of Reactor.stats(), is a gauge, help)
    _FAMILIES = (
        ("agent_proxy_reactor_pairs", "pairs", True,
         "Established connection pairs whose bytes the epoll reactor moves now."),
        ("agent_proxy_reactor_buffered_bytes", "buffered_bytes", True,
         "Bytes the reactor read and holds for destinations that would block."),
        ("agent_proxy_reactor_body_transfers", "transfers", False,
         "HTTP answer bodies the reactor moved socket to socket."),
        ("agent_proxy_reactor_body_bytes", "transferred_bytes", False,
         "Bytes of HTTP answer bodies the reactor moved socket to socket."),
    )  # fmt: skip

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.reactor.stats() if self.reactor is not None else {}
        for name, key, gauge, doc in self._FAMILIES:
            family = (GaugeMetricFamily if gauge else CounterMetricFamily)(name, doc)
            family.add_metric([], stats.get(key, 0))
            yield family


class _Families:
    """The collector registered on the private registry."""

    def __init__(self, families: Sequence[_Counter | _Histogram], identity: _Identity) -> None:
        self._families = families
        self._identity = identity

    def collect(self) -> Iterable[Metric]:
        for family in self._families:
            yield family.family()
        yield from self._identity.families()


class Metrics:
    """All of the sidecar's metrics; cheap to update, rendered on scrape."""

    # prometheus_client's CONTENT_TYPE_PLAIN_0_0_4 (tests/unit/test_metrics.py
    # checks they agree), written out so the class needs no import.
    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        traffic: Sequence[str] = ("listener", "direction", "decision", "reason")
        self._connections = _Counter(
            "agent_proxy_connections_total",
            "Connections by listener, direction, decision and reason.",
            traffic,
        )
        self._active = _Gauge(
            "agent_proxy_connections_active", "Connections open now.", ("listener",)
        )
        self._requests = _Counter(
            "agent_proxy_requests_total",
            "HTTP requests by listener, direction, decision and reason.",
            traffic,
        )
        self._handshake_failures = _Counter(
            "agent_proxy_handshake_failures_total",
            "TLS handshakes that failed, by reason.",
            ("listener", "reason"),
        )
        self._bytes = _Counter(
            "agent_proxy_bytes_total",
            "Bytes relayed: up is toward the target, down is back.",
            ("listener", "direction"),
        )
        self._duration = _Histogram(
            "agent_proxy_request_duration_seconds",
            "HTTP request duration, from the request head to the end of the response.",
            ("listener",),
            DURATION_BUCKETS,
        )
        self._config_reloads = _Counter(
            "agent_proxy_config_reloads_total",
            "Configuration reloads applied (ok) or refused (error, restart_required).",
            ("result",),
        )
        self._dry_run = _Counter(
            "agent_proxy_dry_run_total",
            "Dry-run rule outcomes (would_allow, would_deny); they never change a decision.",
            ("listener", "rule", "outcome"),
        )
        self._quarantines = _Counter(
            "agent_proxy_quarantines_total",
            "Identities quarantined by the tripwire, by reason.",
            ("reason",),
        )
        self._identity = _Identity()
        self._policy = _Gauge(
            "agent_proxy_policy_info",
            "The policy version in force (the value audit records carry), as a label.",
            ("version",),
        )
        self._registry: CollectorRegistry | None = None
        self._collectors: list[Collector] = [
            _Families(
                (
                    self._connections,
                    self._active,
                    self._requests,
                    self._handshake_failures,
                    self._bytes,
                    self._duration,
                    self._config_reloads,
                    self._dry_run,
                    self._quarantines,
                    self._policy,
                ),
                self._identity,
            )
        ]

    # -- hot path ---------------------------------------------------------

    def connection(self, listener: str, direction: str, decision: str, reason: str) -> None:
        self._connections.inc((listener, direction, decision, reason))

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
        self._requests.inc((listener, direction, decision, reason))
        if duration_s is not None:
            self._duration.observe((listener,), duration_s)
        self.transferred(listener, bytes_up, bytes_down)

    def transferred(self, listener: str, bytes_up: int, bytes_down: int) -> None:
        """Bytes relayed outside of :meth:`request` (TCP-mode connections)."""
        if bytes_up:
            self._bytes.inc((listener, "up"), bytes_up)
        if bytes_down:
            self._bytes.inc((listener, "down"), bytes_down)

    def handshake_failure(self, listener: str, reason: str) -> None:
        self._handshake_failures.inc((listener, reason))

    def active(self, listener: str, delta: int) -> None:
        self._active.inc((listener,), delta)

    def dry_run(self, listener: str, rule: str, outcome: str) -> None:
        self._dry_run.inc((listener, rule, outcome))

    def quarantined(self, reason: str) -> None:
        self._quarantines.inc((reason,))

    # -- identity and config ------------------------------------------------

    def watch_identity(self, state: IdentityState, reloads: ReloadCounts) -> None:
        """Follow ``state`` (the SVID's expiry) and a source's reload counts."""
        self._identity.reloads = reloads
        state.subscribe(self._identity_swapped)

    def _identity_swapped(self, snapshot: IdentitySnapshot) -> None:
        self._identity.not_after = snapshot.svid.not_after

    @property
    def registry(self) -> CollectorRegistry:
        """The private registry, made on first use (a scrape) with every
        collector registered so far."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            # auto_describe=False: registering asks a collector nothing (ours
            # have no describe()), so registering late changes nothing.
            self._registry = CollectorRegistry(auto_describe=False)
            for collector in self._collectors:
                self._registry.register(collector)
        return self._registry

    def register(self, collector: Collector) -> None:
        """Export another area's families (audit, credentials, tracing),
        read at scrape time; metrics itself depends on none of them."""
        if self._registry is None:
            self._collectors.append(collector)
        else:
            self._registry.register(collector)

    def set_policy_version(self, version: str) -> None:
        """An info metric: one series, value 1, for the version in force."""
        self._policy.values.clear()
        self._policy.inc((version,))

    def config_reload(self, result: str) -> None:
        self._config_reloads.inc((result,))

    # -- exposition -----------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format 0.0.4 (:attr:`CONTENT_TYPE`)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
