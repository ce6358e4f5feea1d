"""Prometheus families for the routes' credentials, read at scrape time.

Register :class:`CredentialCollector` on the sidecar's private registry
(``Metrics.register(...)``); it reads the providers' counters when
scraped, so the request path only adds to plain ints. Labels are the route
name and the credential type (both from the config, so bounded); no value
ever carries a token, only counts and the seconds left on the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from proxy.credentials.provider import CredentialProvider

__all__ = ["CredentialCollector"]

_LABELS = ("route", "type")


class CredentialCollector:
    def __init__(self, providers: Callable[[], Iterable[CredentialProvider]]) -> None:
        self._providers = providers

    def collect(self) -> Iterable[Metric]:
        fetches = CounterMetricFamily(
            "agent_proxy_credential_fetches", "Credentials fetched, by route.", labels=_LABELS
        )
        failures = CounterMetricFamily(
            "agent_proxy_credential_fetch_failures",
            "Failed credential fetches (token endpoint, Workload API, file), by route.",
            labels=_LABELS,
        )
        unavailable = CounterMetricFamily(
            "agent_proxy_credential_unavailable",
            "Requests answered 503 credential_unavailable, by route.",
            labels=_LABELS,
        )
        expiry = GaugeMetricFamily(
            "agent_proxy_credential_expiry_seconds",
            "Seconds until the current credential expires (absent: static or none).",
            labels=_LABELS,
        )
        for p in self._providers():
            labels = [p.route, p.kind]
            fetches.add_metric(labels, p.fetches)
            failures.add_metric(labels, p.failures)
            unavailable.add_metric(labels, p.unavailable)
            left = p.seconds_left()
            if left is not None:
                expiry.add_metric(labels, left)
        yield from (fetches, failures, unavailable, expiry)
