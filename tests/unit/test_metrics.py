"""Metrics: the families and labels we promise, and the SVID expiry gauge
following rotations."""

from __future__ import annotations

import datetime as dt

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics

NOW = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


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
    m.identity_reload("ok")
    m.identity_reload("error")
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
        "agent_proxy_svid_expiry_seconds gauge",
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


def test_svid_expiry_follows_rotations() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    key = ("agent_proxy_svid_expiry_seconds", ())
    assert key not in samples(m)  # no SVID yet: no sample, rather than a made-up one
    m.set_svid_not_after(NOW + dt.timedelta(hours=1))
    assert samples(m)[key] == 3600
    clock.now = NOW + dt.timedelta(minutes=45)  # computed at scrape time
    assert samples(m)[key] == 900
    m.set_svid_not_after(NOW + dt.timedelta(hours=2))  # a rotation
    assert samples(m)[key] == 4500
    clock.now = NOW + dt.timedelta(hours=3)
    assert samples(m)[key] == -3600


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
