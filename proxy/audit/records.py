"""Audit records: values the core returns.

Theory of operation: every decision the sidecar makes becomes a frozen value.
Code that decides builds the value; only the sink turns it into a JSON line,
and metrics are derived from the same value (:mod:`proxy.audit.derive`), so
what is counted is exactly what is recorded. Tests assert on records as the
consequence of an event without parsing logs.

Two shapes, one wire format:

* :class:`AuditRecord`, the generic record today's listeners build (event
  name plus ``extra``). :func:`typed` turns it into one of the typed values.
* The typed values (:class:`ConnectionOpened`, :class:`ConnectionRefused`,
  :class:`ConnectionClosed`, :class:`HttpRequest`, :class:`AgentCall`), whose
  fields say what each kind of decision carries. Each shares a
  :class:`ConnFacts` (who, where, which listener) and renders to the same
  documented JSON fields as the generic record.

Every record may carry ``trace_id``/``span_id`` (W3C trace context); the
sink adds ``seq`` and ``prev`` (the hash chain) when it writes the line.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

Direction = Literal["inbound", "outbound"]
Verdict = Literal["allow", "deny"]
AgentProtocol = Literal["mcp", "a2a"]

# Two seconds remembered: the record's own time and the one other moment a
# connection's records carry (the peer certificate's notAfter) alternate, and
# one slot would miss on every call.
_second_cache: tuple[int, str, int, str] = (-1, "", -1, "")


def rfc3339(moment: _dt.datetime) -> str:
    """RFC 3339 in UTC with millisecond precision and a ``Z`` suffix.

    strftime runs once per distinct second, not once per record: on the hot
    path every request writes at least one record."""
    global _second_cache
    utc = moment if moment.tzinfo is _dt.UTC else moment.astimezone(_dt.UTC)
    second = int(utc.timestamp() // 1)  # floor: before 1970 too
    first, prefix, other, other_prefix = _second_cache
    if second != first:
        prefix = other_prefix if second == other else utc.strftime("%Y-%m-%dT%H:%M:%S.")
        # Most recent first: the next record's time is most likely this one.
        _second_cache = (second, prefix, first, _second_cache[1])
    return prefix + _MILLIS[utc.microsecond // 1000]


# "000Z".."999Z": a table lookup costs less than a format spec per record.
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class Renderable(Protocol):
    """What the sink accepts: anything that renders to the documented fields."""

    def as_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True, init=False)
class AuditRecord:
    """One decision. ``extra`` carries event-specific fields (bytes, status...)."""

    event: str
    direction: Direction
    decision: Verdict
    reason: str
    listener: str = ""
    conn_id: str = ""
    rule: str | None = None
    peer_id: str | None = None
    local_id: str | None = None
    peer_addr: str | None = None
    target: str | None = None
    peer_cert_serial: str | None = None
    peer_cert_not_after: str | None = None
    ts: _dt.datetime = field(default_factory=utcnow)
    extra: Mapping[str, Any] = field(default_factory=dict)
    trace_id: str | None = None
    span_id: str | None = None

    def __init__(
        self,
        event: str,
        direction: Direction,
        decision: Verdict,
        reason: str,
        listener: str = "",
        conn_id: str = "",
        rule: str | None = None,
        peer_id: str | None = None,
        local_id: str | None = None,
        peer_addr: str | None = None,
        target: str | None = None,
        peer_cert_serial: str | None = None,
        peer_cert_not_after: str | None = None,
        ts: _dt.datetime | None = None,
        extra: Mapping[str, Any] | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
    ) -> None:
        # The generated frozen __init__ sets each field by name through
        # object.__setattr__: 2 us for these 17 on every record (the hot path
        # writes one or two per request). The slots' own setters take a third
        # less and leave the instance as frozen (assignment still raises).
        s = _SLOT_SETTERS
        s[0](self, event)
        s[1](self, direction)
        s[2](self, decision)
        s[3](self, reason)
        s[4](self, listener)
        s[5](self, conn_id)
        s[6](self, rule)
        s[7](self, peer_id)
        s[8](self, local_id)
        s[9](self, peer_addr)
        s[10](self, target)
        s[11](self, peer_cert_serial)
        s[12](self, peer_cert_not_after)
        s[13](self, utcnow() if ts is None else ts)
        s[14](self, {} if extra is None else extra)
        s[15](self, trace_id)
        s[16](self, span_id)

    def as_dict(self) -> dict[str, Any]:
        # A literal in the documented field order: built once per record on
        # the hot path, so no loop over field names.
        out: dict[str, Any] = {
            "ts": rfc3339(self.ts),
            "event": self.event,
            "direction": self.direction,
            "listener": self.listener,
            "conn_id": self.conn_id,
            "decision": self.decision,
            "reason": self.reason,
            "rule": self.rule,
            "peer_id": self.peer_id,
            "local_id": self.local_id,
            "peer_addr": self.peer_addr,
            "target": self.target,
            "peer_cert_serial": self.peer_cert_serial,
            "peer_cert_not_after": self.peer_cert_not_after,
        }
        if self.extra:
            out.update(self.extra)
        if self.trace_id is not None:
            out["trace_id"] = self.trace_id
            out["span_id"] = self.span_id
        return out


# In field order, as AuditRecord.__init__ indexes them.
_SLOT_SETTERS: tuple[Any, ...] = tuple(
    AuditRecord.__dict__[f.name].__set__ for f in fields(AuditRecord)
)


@dataclass(frozen=True, slots=True)
class ConnFacts:
    """What every record of one connection shares."""

    direction: Direction
    listener: str = ""
    conn_id: str = ""
    local_id: str | None = None
    peer_id: str | None = None
    peer_addr: str | None = None
    target: str | None = None
    peer_cert_serial: str | None = None
    peer_cert_not_after: str | None = None
    rule: str | None = None
    client_addr: str | None = None
    trace_id: str | None = None
    span_id: str | None = None


def _base(
    facts: ConnFacts,
    event: str,
    decision: Verdict,
    reason: str,
    ts: _dt.datetime,
    rule: str | None,
) -> AuditRecord:
    return AuditRecord(
        event=event,
        direction=facts.direction,
        decision=decision,
        reason=reason,
        listener=facts.listener,
        conn_id=facts.conn_id,
        rule=rule,
        peer_id=facts.peer_id,
        local_id=facts.local_id,
        peer_addr=facts.peer_addr,
        target=facts.target,
        peer_cert_serial=facts.peer_cert_serial,
        peer_cert_not_after=facts.peer_cert_not_after,
        ts=ts,
        trace_id=facts.trace_id,
        span_id=facts.span_id,
    )


def _render(base: AuditRecord, facts: ConnFacts, fields: Mapping[str, Any]) -> dict[str, Any]:
    out = base.as_dict()
    if facts.client_addr is not None:
        out["client_addr"] = facts.client_addr
    out.update((k, v) for k, v in fields.items() if v is not None)
    return out


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    facts: ConnFacts
    reason: str = "peer_allowed"
    ts: _dt.datetime = field(default_factory=utcnow)
    event = "connection.open"

    def as_dict(self) -> dict[str, Any]:
        base = _base(self.facts, self.event, "allow", self.reason, self.ts, self.facts.rule)
        return _render(base, self.facts, {})


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    facts: ConnFacts
    reason: str
    error: str | None = None
    ts: _dt.datetime = field(default_factory=utcnow)
    event = "connection.refused"

    @property
    def handshake_failure(self) -> bool:
        """A refusal in or around the TLS handshake (not a cap or our own state)."""
        return self.reason not in ("connection_limit", "audit_unavailable", "own_svid_expired")

    def as_dict(self) -> dict[str, Any]:
        base = _base(self.facts, self.event, "deny", self.reason, self.ts, self.facts.rule)
        return _render(base, self.facts, {"error": self.error})


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    facts: ConnFacts
    reason: str
    decision: Verdict = "allow"
    bytes_up: int | None = None
    bytes_down: int | None = None
    duration_ms: int | None = None
    requests: int | None = None
    error: str | None = None
    ts: _dt.datetime = field(default_factory=utcnow)
    event = "connection.close"

    def as_dict(self) -> dict[str, Any]:
        base = _base(self.facts, self.event, self.decision, self.reason, self.ts, self.facts.rule)
        fields = {
            "error": self.error,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": self.duration_ms,
            "requests": self.requests,
        }
        return _render(base, self.facts, fields)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    facts: ConnFacts
    decision: Verdict
    reason: str
    rule: str | None = None
    request_id: str = ""
    method: str = ""
    path: str = ""
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: int | None = None
    error: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # policy_version, dry_run...
    ts: _dt.datetime = field(default_factory=utcnow)
    event = "http.request"

    def as_dict(self) -> dict[str, Any]:
        base = _base(self.facts, self.event, self.decision, self.reason, self.ts, self.rule)
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": self.duration_ms,
            "error": self.error,
            **self.extra,
        }
        return _render(base, self.facts, fields)


@dataclass(frozen=True, slots=True)
class AgentCall:
    """One JSON-RPC call of an agent protocol, beside its request's record."""

    facts: ConnFacts
    protocol: AgentProtocol
    decision: Verdict
    reason: str
    rule: str | None = None
    request_id: str = ""
    path: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # tool, mcp_method, a2a_method...
    ts: _dt.datetime = field(default_factory=utcnow)
    # The wire name predates A2A support; both protocols keep it.
    event = "mcp.call"

    def as_dict(self) -> dict[str, Any]:
        base = _base(self.facts, self.event, self.decision, self.reason, self.ts, self.rule)
        fields = {"request_id": self.request_id, "path": self.path, **self.extra}
        return _render(base, self.facts, fields)


Typed = ConnectionOpened | ConnectionRefused | ConnectionClosed | HttpRequest | AgentCall


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def typed(record: AuditRecord) -> Typed | None:
    """The typed value a generic record stands for (None: not a decision kind)."""
    extra = dict(record.extra)
    facts = ConnFacts(
        direction=record.direction,
        listener=record.listener,
        conn_id=record.conn_id,
        local_id=record.local_id,
        peer_id=record.peer_id,
        peer_addr=record.peer_addr,
        target=record.target,
        peer_cert_serial=record.peer_cert_serial,
        peer_cert_not_after=record.peer_cert_not_after,
        rule=record.rule,
        client_addr=_str(extra.pop("client_addr", None)),
        trace_id=record.trace_id,
        span_id=record.span_id,
    )
    event, ts = record.event, record.ts
    if event == "connection.open":
        return ConnectionOpened(facts, record.reason, ts)
    if event == "connection.refused":
        return ConnectionRefused(facts, record.reason, _str(extra.get("error")), ts)
    if event == "connection.close":
        return ConnectionClosed(
            facts,
            record.reason,
            record.decision,
            _int(extra.get("bytes_up")),
            _int(extra.get("bytes_down")),
            _int(extra.get("duration_ms")),
            _int(extra.get("requests")),
            _str(extra.get("error")),
            ts,
        )
    if event == "http.request":
        known = {
            k: extra.pop(k, None)
            for k in ("request_id", "method", "path", "status", "bytes_up", "bytes_down")
        }
        duration, error = extra.pop("duration_ms", None), extra.pop("error", None)
        return HttpRequest(
            facts,
            record.decision,
            record.reason,
            record.rule,
            str(known["request_id"] or ""),
            str(known["method"] or ""),
            str(known["path"] or ""),
            _int(known["status"]),
            _int(known["bytes_up"]) or 0,
            _int(known["bytes_down"]) or 0,
            _int(duration),
            _str(error),
            extra,
            ts,
        )
    if event == "mcp.call":
        request_id, path = extra.pop("request_id", ""), extra.pop("path", "")
        protocol: AgentProtocol = "a2a" if "a2a_method" in extra else "mcp"
        return AgentCall(
            facts,
            protocol,
            record.decision,
            record.reason,
            record.rule,
            str(request_id or ""),
            str(path or ""),
            extra,
            ts,
        )
    return None
