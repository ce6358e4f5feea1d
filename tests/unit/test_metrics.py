"""Metrics: the families and labels we promise, and the identity metrics
following rotations and the source's counts."""

from __future__ import annotations

import datetime as dt

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.identity import IdentityState
from proxy.metrics import Metrics
from proxy.sources import SourceStats
from tests.integration.tls_support import snapshot
from tests.pki import TestCA

NOW = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_families_and_labels() -> None:
    m = Metrics()
    m.connection("hr-api", "inbound", "allow", "peer_allowed")
    m.connection("hr-api", "inbound", "allow", "peer_allowed")
    m.connection("hr-api", "inbound", "deny", "peer_not_allowed")
    m.active("hr-api", 1)
    m.active("hr-api", 1)
    m.active("hr-api", -1)
    m.request("egress", "outbound", "allow", "rule_matched", 0.004, 120, 4096)
    m.request("egress", "outbound", "deny", "no_matching_rule", 0.0005, 80, 0)
    m.handshake_failure("hr-api", "untrusted_chain")
    m.transferred("l4", 10, 20)
    ca = TestCA.create("a.org")
    stats = SourceStats(reloads_ok=1, reloads_failed=1)
    m.watch_identity(IdentityState(snapshot(ca.issue("spiffe://a.org/x"), ca)), stats)
    m.config_reload("ok")
    got = samples(m)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    traffic = {"listener": "hr-api", "direction": "inbound"}
    assert (
        value("agent_proxy_connections_total", **traffic, decision="allow", reason="peer_allowed")
        == 2
    )
    assert (
        value(
            "agent_proxy_connections_total", **traffic, decision="deny", reason="peer_not_allowed"
        )
        == 1
    )
    assert value("agent_proxy_connections_active", listener="hr-api") == 1
    assert (
        value(
            "agent_proxy_requests_total",
            listener="egress",
            direction="outbound",
            decision="deny",
            reason="no_matching_rule",
        )
        == 1
    )
    assert (
        value("agent_proxy_handshake_failures_total", listener="hr-api", reason="untrusted_chain")
        == 1
    )
    assert value("agent_proxy_bytes_total", listener="egress", direction="up") == 200
    assert value("agent_proxy_bytes_total", listener="egress", direction="down") == 4096
    assert value("agent_proxy_bytes_total", listener="l4", direction="down") == 20
    duration = "agent_proxy_request_duration_seconds"
    assert value(f"{duration}_count", listener="egress") == 2
    assert value(f"{duration}_bucket", listener="egress", le="0.001") == 1
    assert value(f"{duration}_bucket", listener="egress", le="0.005") == 2
    assert value(f"{duration}_bucket", listener="egress", le="10.0") == 2
    assert value("agent_proxy_identity_reloads_total", result="ok") == 1
    assert value("agent_proxy_identity_reloads_total", result="error") == 1
    assert value("agent_proxy_config_reloads_total", result="ok") == 1

    text = m.render().decode()
    for family in [
        "agent_proxy_connections_total counter",
        "agent_proxy_connections_active gauge",
        "agent_proxy_requests_total counter",
        "agent_proxy_handshake_failures_total counter",
        "agent_proxy_bytes_total counter",
        "agent_proxy_request_duration_seconds histogram",
        "agent_proxy_svid_expiry_timestamp_seconds gauge",
        "agent_proxy_identity_reloads_total counter",
        "agent_proxy_config_reloads_total counter",
    ]:
        assert f"# TYPE {family}\n" in text
    assert "_created" not in text


def test_buckets_span_a_millisecond_to_ten_seconds() -> None:
    m = Metrics()
    m.request("x", "inbound", "allow", "rule_matched", 0.2)
    text = m.render().decode()
    assert 'le="0.001"' in text and 'le="10.0"' in text and 'le="+Inf"' in text


def test_svid_expiry_is_a_timestamp_that_follows_rotations() -> None:
    ca = TestCA.create("a.org")
    first = ca.issue("spiffe://a.org/x", not_before=NOW, not_after=NOW + dt.timedelta(hours=1))
    later = NOW + dt.timedelta(hours=2)
    second = ca.issue("spiffe://a.org/x", not_before=NOW, not_after=later)
    m = Metrics()
    key = ("agent_proxy_svid_expiry_timestamp_seconds", ())
    assert key not in samples(m)  # no SVID yet: no sample, rather than a made-up one
    state = IdentityState(snapshot(first, ca))
    m.watch_identity(state, SourceStats())
    assert samples(m)[key] == (NOW + dt.timedelta(hours=1)).timestamp()  # absolute Unix time
    state.swap(snapshot(second, ca))  # a rotation
    assert samples(m)[key] == later.timestamp()


def test_identity_reloads_are_the_source_counts() -> None:
    ca = TestCA.create("a.org")
    stats = SourceStats()
    m = Metrics()
    m.watch_identity(IdentityState(snapshot(ca.issue("spiffe://a.org/x"), ca)), stats)
    ok = ("agent_proxy_identity_reloads_total", (("result", "ok"),))
    error = ("agent_proxy_identity_reloads_total", (("result", "error"),))
    assert samples(m)[ok] == 0 and samples(m)[error] == 0
    stats.record_success(NOW, swapped=True)
    stats.record_success(NOW, swapped=False)  # unchanged: not a reload
    stats.record_failure("refused")
    stats.record_failure("refused")
    assert samples(m)[ok] == 1 and samples(m)[error] == 2


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.connection("only-a", "inbound", "allow", "peer_allowed")
    assert b"only-a" not in b.render()
    assert (
        REGISTRY.get_sample_value(
            "agent_proxy_connections_total",
            {
                "listener": "only-a",
                "direction": "inbound",
                "decision": "allow",
                "reason": "peer_allowed",
            },
        )
        is None
    )


def test_content_type_is_text_0_0_4() -> None:
    assert Metrics.CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    # Written out in proxy.metrics so the class needs no import: the same value.
    from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

    assert Metrics.CONTENT_TYPE == CONTENT_TYPE_PLAIN_0_0_4


def test_collectors_registered_before_the_registry_exists_are_scraped() -> None:
    # The registry is made on first use (a scrape); what was registered
    # before it (the audit sink's, tracing's collectors) is in it.
    class One:
        def collect(self) -> list[object]:
            from prometheus_client.core import GaugeMetricFamily

            g = GaugeMetricFamily("agent_proxy_test_early", "registered early")
            g.add_metric([], 1.0)
            return [g]

    metrics = Metrics()
    metrics.register(One())  # type: ignore[arg-type]
    assert b"agent_proxy_test_early 1.0" in metrics.render()
    assert metrics.registry.get_sample_value("agent_proxy_test_early") == 1.0
