"""Metrics derived from audit records, so what is counted is what is recorded.

A listener calls :func:`count` with the record it has just emitted; the
dispatch is on the record's typed value (:func:`typed`). The kinds emitted
per request or per connection (requests, agent calls, opens, closes) are
read straight from the generic record instead, with the same field reads
``typed`` makes; a test keeps the two ways equal.
``agent_proxy_connections_total`` counts connections: one per refusal or
open (and one for a connection that ended before it opened, such as an
unreachable target), not opens plus closes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.audit.records import (
    AgentCall,
    AuditRecord,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRefused,
    HttpRequest,
    Typed,
    typed,
)

if TYPE_CHECKING:
    from proxy.metrics import Metrics

# Close reasons of a connection that never reached connection.open.
_NEVER_OPENED = frozenset({"target_unreachable", "target_connect_timeout"})


def count(metrics: Metrics, record: AuditRecord | Typed) -> None:
    if isinstance(record, AuditRecord):
        # Every request and every agent call: skip building the typed value.
        if record.event == "http.request":
            _http_request(metrics, record)
            return
        if record.event == "mcp.call":
            # What an AgentCall counts: its guard outcomes (the call itself
            # is counted through its HTTP request). typed() leaves both keys
            # in the value's extra as they are in the record's.
            extra = record.extra
            if "dry_run" in extra or "quarantine_reason" in extra:  # rarely: skip the call
                _guard_outcomes(metrics, record.listener, extra)
            return
        # Every connection opens and closes once: read them directly too.
        if record.event == "connection.open":
            metrics.connection(record.listener, record.direction, "allow", record.reason)
            return
        if record.event == "connection.close":
            _connection_closed(metrics, record)
            return
    value = typed(record) if isinstance(record, AuditRecord) else record
    if value is None:
        return
    facts = value.facts
    listener, direction = facts.listener, facts.direction
    if isinstance(value, HttpRequest | AgentCall):
        _guard_outcomes(metrics, listener, value.extra)
        if isinstance(value, HttpRequest):
            duration = value.duration_ms
            metrics.request(
                listener,
                direction,
                value.decision,
                value.reason,
                duration / 1000 if duration is not None else None,
                value.bytes_up,
                value.bytes_down,
            )
        return  # an agent call is counted through its HTTP request
    if isinstance(value, ConnectionOpened):
        metrics.connection(listener, direction, "allow", value.reason)
    elif isinstance(value, ConnectionRefused):
        metrics.connection(listener, direction, "deny", value.reason)
        if value.handshake_failure:
            metrics.handshake_failure(listener, value.reason)
    elif isinstance(value, ConnectionClosed):
        if value.reason in _NEVER_OPENED:
            metrics.connection(listener, direction, "deny", value.reason)
        if value.bytes_up or value.bytes_down:
            metrics.transferred(listener, value.bytes_up or 0, value.bytes_down or 0)


def _http_request(metrics: Metrics, record: AuditRecord) -> None:
    """What :func:`count` does with ``typed(record)`` for an ``http.request``
    record, read from the record's fields as :func:`typed` reads them."""
    extra = record.extra
    if "dry_run" in extra or "quarantine_reason" in extra:  # as for mcp.call above
        _guard_outcomes(metrics, record.listener, extra)
    duration = _int(extra.get("duration_ms"))
    metrics.request(
        record.listener,
        record.direction,
        record.decision,
        record.reason,
        duration / 1000 if duration is not None else None,
        _int(extra.get("bytes_up")) or 0,
        _int(extra.get("bytes_down")) or 0,
    )


def _connection_closed(metrics: Metrics, record: AuditRecord) -> None:
    """What :func:`count` does with ``typed(record)`` for a
    ``connection.close`` record."""
    if record.reason in _NEVER_OPENED:
        metrics.connection(record.listener, record.direction, "deny", record.reason)
    up, down = _int(record.extra.get("bytes_up")), _int(record.extra.get("bytes_down"))
    if up or down:
        metrics.transferred(record.listener, up or 0, down or 0)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _guard_outcomes(metrics: Metrics, listener: str, extra: Mapping[str, Any]) -> None:
    dry_run = extra.get("dry_run")
    if isinstance(dry_run, list):
        for item in dry_run:
            if isinstance(item, dict):
                metrics.dry_run(listener, str(item.get("rule")), str(item.get("outcome")))
    tripped = extra.get("quarantine_reason")
    if tripped is not None:
        metrics.quarantined(str(tripped))
