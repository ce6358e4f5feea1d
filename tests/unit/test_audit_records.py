"""Typed audit records: the same JSON as today's generic records, and
metrics derived from the values, not from event-name strings."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from proxy.audit import (
    AgentCall,
    AuditRecord,
    AuditSettings,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRefused,
    ConnFacts,
    HttpRequest,
    typed,
)
from proxy.audit import parse_audit as parse_audit_table
from proxy.audit.derive import count
from proxy.config import ConfigError
from proxy.config.walker import Ctx, Table
from proxy.metrics import Metrics
from proxy.tracing import TracingSettings
from proxy.tracing import parse_tracing as parse_tracing_table


def parse_audit(data: dict[str, object], *, base_dir: Path | None = None) -> AuditSettings:
    """The ``[audit]`` table as the config walker hands it over."""
    return parse_audit_table(Table(Ctx("", base_dir or Path.cwd()), "audit", data))


def parse_tracing(data: dict[str, object]) -> TracingSettings:
    return parse_tracing_table(Table(Ctx("", Path.cwd()), "tracing", data))


TS = dt.datetime(2026, 12, 1, 12, 0, 0, 123000, tzinfo=dt.UTC)
FACTS = ConnFacts(
    direction="inbound",
    listener="hr-api",
    conn_id="1-1",
    local_id="spiffe://a.example/svc/hr",
    peer_id="spiffe://a.example/agent/payroll",
    peer_addr="127.0.0.1:5000",
    target="127.0.0.1:8080",
    rule="spiffe://a.example/agent/*",
)


def generic(event: str, decision: str, reason: str, **extra: object) -> AuditRecord:
    return AuditRecord(
        event=event,
        direction="inbound",
        decision="allow" if decision == "allow" else "deny",
        reason=reason,
        listener="hr-api",
        conn_id="1-1",
        rule=FACTS.rule,
        peer_id=FACTS.peer_id,
        local_id=FACTS.local_id,
        peer_addr=FACTS.peer_addr,
        target=FACTS.target,
        ts=TS,
        extra=extra,
    )


@pytest.mark.parametrize(
    ("record", "value"),
    [
        (generic("connection.open", "allow", "peer_allowed"), ConnectionOpened(FACTS, ts=TS)),
        (
            generic("connection.refused", "deny", "untrusted_chain", error="bad chain"),
            ConnectionRefused(FACTS, "untrusted_chain", "bad chain", TS),
        ),
        (
            generic("connection.close", "allow", "closed", bytes_up=1, bytes_down=2, duration_ms=3),
            ConnectionClosed(FACTS, "closed", bytes_up=1, bytes_down=2, duration_ms=3, ts=TS),
        ),
    ],
)
def test_typed_values_render_as_the_generic_records(record: AuditRecord, value: object) -> None:
    assert typed(record) == value
    assert json.dumps(value.as_dict()) == json.dumps(record.as_dict())  # type: ignore[attr-defined]


def test_http_request_and_agent_call_round_trip() -> None:
    request = generic(
        "http.request",
        "allow",
        "rule_matched",
        request_id="r1",
        method="GET",
        path="/timesheets/1",
        status=200,
        bytes_up=0,
        bytes_down=10,
        duration_ms=4,
        policy_version="sha256:x",
    )
    value = typed(request)
    assert isinstance(value, HttpRequest)
    assert (value.method, value.status, value.extra) == ("GET", 200, {"policy_version": "sha256:x"})
    assert value.as_dict() == request.as_dict()
    call = typed(
        generic(
            "mcp.call",
            "deny",
            "denied_by_rule",
            request_id="r1",
            path="/mcp",
            a2a_method="tasks/send",
        )
    )
    assert isinstance(call, AgentCall) and call.protocol == "a2a"
    mcp = typed(generic("mcp.call", "allow", "rule_matched", tool="read_timesheet"))
    assert isinstance(mcp, AgentCall) and mcp.protocol == "mcp"


def test_trace_fields_are_rendered_when_set() -> None:
    record = AuditRecord(
        "http.request", "inbound", "allow", "rule_matched", trace_id="a" * 32, span_id="b" * 16
    )
    out = record.as_dict()
    assert (out["trace_id"], out["span_id"]) == ("a" * 32, "b" * 16)
    assert "trace_id" not in generic("connection.open", "allow", "peer_allowed").as_dict()


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metrics_are_derived_from_records() -> None:
    metrics = Metrics()
    for record in (
        generic("connection.open", "allow", "peer_allowed"),
        generic("connection.close", "allow", "closed", bytes_up=5, bytes_down=7),
        generic("connection.refused", "deny", "untrusted_chain"),
        generic("connection.refused", "deny", "connection_limit"),
        generic("http.request", "allow", "rule_matched", duration_ms=12, bytes_up=1, bytes_down=2),
        generic(
            "mcp.call", "allow", "rule_matched", dry_run=[{"rule": "r", "outcome": "would_deny"}]
        ),
    ):
        count(metrics, record)
    traffic = {"listener": "hr-api", "direction": "inbound"}
    # One per connection: the open and the close of one connection count once.
    assert (
        _value(
            metrics,
            "agent_proxy_connections_total",
            **traffic,
            decision="allow",
            reason="peer_allowed",
        )
        == 1
    )
    assert (
        _value(
            metrics, "agent_proxy_connections_total", **traffic, decision="allow", reason="closed"
        )
        is None
    )
    assert (
        _value(
            metrics,
            "agent_proxy_handshake_failures_total",
            listener="hr-api",
            reason="untrusted_chain",
        )
        == 1
    )
    assert (
        _value(
            metrics,
            "agent_proxy_handshake_failures_total",
            listener="hr-api",
            reason="connection_limit",
        )
        is None
    )
    assert (
        _value(
            metrics,
            "agent_proxy_requests_total",
            **traffic,
            decision="allow",
            reason="rule_matched",
        )
        == 1
    )
    assert _value(metrics, "agent_proxy_bytes_total", listener="hr-api", direction="up") == 6
    assert (
        _value(
            metrics, "agent_proxy_dry_run_total", listener="hr-api", rule="r", outcome="would_deny"
        )
        == 1
    )
    # A typed value counts exactly like its generic record.
    count(metrics, ConnectionOpened(FACTS))
    assert (
        _value(
            metrics,
            "agent_proxy_connections_total",
            **traffic,
            decision="allow",
            reason="peer_allowed",
        )
        == 2
    )


def test_audit_section_defaults_and_values(tmp_path: Path) -> None:
    assert parse_audit({}) == AuditSettings()
    settings = parse_audit(
        {
            "path": "audit.jsonl",
            "durability": "fsync",
            "fsync_interval": "50ms",
            "checkpoint_interval": 30,
            "max_bytes": "100MiB",
            "max_age": "1d",
            "keep": 7,
            "on_failure": "open",
        },
        base_dir=tmp_path,
    )
    assert settings == AuditSettings(
        path=str(tmp_path / "audit.jsonl"),
        durability="fsync",
        fsync_interval=0.05,
        checkpoint_interval=30.0,
        max_bytes=100 << 20,
        max_age=86400.0,
        keep=7,
        on_failure="open",
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"durability": "x"}, 'audit.durability: expected "os" or "fsync", got "x"'),
        ({"on_failure": "maybe"}, 'audit.on_failure: expected "closed" or "open", got "maybe"'),
        ({"durabilty": "os"}, "unknown key 'audit.durabilty' (did you mean 'durability'?)"),
        (
            {"max_bytes": "lots", "path": "a"},
            "audit.max_bytes: expected bytes such as 104857600 or \"100MiB\", got 'lots'",
        ),
        ({"keep": -1}, "audit.keep: expected at least 0, got -1"),
        ({"fsync_interval": "soon"}, "audit.fsync_interval: "),
        ({"max_bytes": 1000}, "audit.max_bytes: rotation needs a file path"),
        ({"path": ""}, 'audit.path: expected a non-empty string, got ""'),
    ],
)
def test_audit_section_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_audit(table)
    assert str(caught.value).startswith(message)


def test_tracing_section() -> None:
    assert parse_tracing({}).otlp_endpoint is None
    settings = parse_tracing({"otlp_endpoint": "http://collector:4318", "service_name": "payroll"})
    assert settings.traces_url == "http://collector:4318/v1/traces"
    with pytest.raises(
        ConfigError,
        match=re.escape('expected an http:// or https:// URL, got "collector:4318"'),
    ):
        parse_tracing({"otlp_endpoint": "collector:4318"})
    with pytest.raises(ConfigError, match=re.escape("unknown key 'tracing.endpoint'")):
        parse_tracing({"endpoint": "http://x"})


def test_config_file_carries_the_audit_and_tracing_sections(tmp_path: Path) -> None:
    from proxy.config import parse_config
    from tests.unit.test_config import BASE

    data = {
        **BASE,
        "audit": {"path": "trail/audit.jsonl", "durability": "fsync", "on_failure": "open"},
        "tracing": {"otlp_endpoint": "http://127.0.0.1:4318"},
    }
    config = parse_config(data, "sidecar.toml", base_dir=tmp_path)
    assert config.audit.path == str(tmp_path / "trail/audit.jsonl")
    assert (config.audit.durability, config.audit.on_failure) == ("fsync", "open")
    assert config.tracing.traces_url == "http://127.0.0.1:4318/v1/traces"
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "audit": {"durability": "x"}}, "sidecar.toml", base_dir=tmp_path)
    assert str(caught.value) == 'sidecar.toml: audit.durability: expected "os" or "fsync", got "x"'


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ("http.request", "rate_limited"),
        ("mcp.call", "rate_limited"),
        ("connection.open", "peer_allowed"),
        ("connection.close", "closed"),
        ("connection.close", "target_unreachable"),  # never opened: counted as a refusal
    ],
)
def test_a_record_read_directly_counts_the_same_as_its_typed_value(event: str, reason: str) -> None:
    """count() reads requests, calls, opens and closes directly (no typed
    value per record); it must count exactly what the typed value counts."""
    record = generic(
        event,
        "deny",
        reason,
        duration_ms=40,
        bytes_up=3,
        bytes_down=9,
        dry_run=[{"rule": "r", "outcome": "would_allow"}],
        quarantine_reason="deny_burst",
    )
    direct, via_typed = Metrics(), Metrics()
    count(direct, record)
    value = typed(record)
    assert value is not None
    count(via_typed, value)

    def samples(m: Metrics) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in m.registry.collect()
            for s in family.samples
            if s.name.startswith("agent_proxy_") and "svid" not in s.name
        )

    assert samples(direct) == samples(via_typed)
    counted = {name for name, _, _ in samples(direct)}
    if event.startswith("connection."):
        expected = {"connection.open": "agent_proxy_connections_total",
                    "connection.close": "agent_proxy_bytes_total"}[event]  # fmt: skip
        assert expected in counted
        if reason == "target_unreachable":
            assert "agent_proxy_connections_total" in counted
        return
    assert {"agent_proxy_quarantines_total", "agent_proxy_dry_run_total"} <= counted
    if event == "http.request":
        assert "agent_proxy_requests_total" in counted
    else:
        assert "agent_proxy_requests_total" not in counted


def test_rfc3339_renders_each_moment_of_an_alternating_pair() -> None:
    # A connection's records alternate their own time with the peer
    # certificate's notAfter; the cache of rendered seconds must never hand
    # one moment the other's second.
    from proxy.audit.records import rfc3339

    moments = [
        dt.datetime(2026, 3, 1, 12, 0, 5, 123456, tzinfo=dt.UTC),
        dt.datetime(2027, 1, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 1, 12, 0, 5, 999000, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 1, 12, 0, 6, 1000, tzinfo=dt.UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=dt.UTC),
        dt.datetime(1970, 1, 1, 0, 0, 0, 500000, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 1, 13, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=1))),
    ]
    for moment in moments * 3 + moments[::-1] * 2:
        utc = moment.astimezone(dt.UTC)
        expected = utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
        assert rfc3339(moment) == expected


def test_audit_record_init_sets_every_field_and_stays_frozen() -> None:
    # AuditRecord's own __init__ sets the slots by position; a field added,
    # removed or moved without it would land a value in the wrong slot.
    import dataclasses

    names = [f.name for f in dataclasses.fields(AuditRecord)]
    values: dict[str, object] = {name: f"value of {name}" for name in names}
    values["ts"] = dt.datetime(2026, 3, 1, 12, 0, 5, tzinfo=dt.UTC)
    values["extra"] = {"k": "v"}
    record = AuditRecord(**values)  # type: ignore[arg-type]
    assert {name: getattr(record, name) for name in names} == values
    positional = AuditRecord(*values.values())  # type: ignore[arg-type]
    assert positional == record
    assert dataclasses.replace(record, reason="other").reason == "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.reason = "changed"  # type: ignore[misc]
    # The defaults: a fresh extra and the time of making.
    before = dt.datetime.now(dt.UTC)
    bare = AuditRecord("e", "inbound", "allow", "r")
    assert bare.extra == {} and bare.extra is not AuditRecord("e", "inbound", "allow", "r").extra
    assert before <= bare.ts <= dt.datetime.now(dt.UTC)
    assert (bare.listener, bare.rule, bare.trace_id, bare.span_id) == ("", None, None, None)
