"""Audit records: values the core returns, and the one sink that writes them.

Theory of operation: every decision the sidecar makes (a connection refused,
opened, closed; later, a request allowed or denied) becomes an
:class:`AuditRecord`, a frozen value. Code that decides builds the record;
only :class:`AuditSink` turns it into a JSON line. Tests assert on records as
the consequence of an event without parsing logs.

The sink serialises each record exactly once, batches lines in memory (one
event-loop thread writes, so no lock) and flushes them with one ``write`` at
least every ``flush_interval`` and at shutdown, so lines never interleave.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal

Direction = Literal["inbound", "outbound"]
Verdict = Literal["allow", "deny"]



_second_cache: tuple[int, str] = (-1, "")


def rfc3339(moment: _dt.datetime) -> str:
    """RFC 3339 in UTC with millisecond precision and a ``Z`` suffix.

    strftime runs once per second, not once per record: on the hot path
    every request writes at least one record."""
    global _second_cache
    utc = moment if moment.tzinfo is _dt.UTC else moment.astimezone(_dt.UTC)
    second = int(utc.timestamp())
    cached_second, prefix = _second_cache
    if second != cached_second:
        prefix = utc.strftime("%Y-%m-%dT%H:%M:%S.")
        _second_cache = (second, prefix)
    return f"{prefix}{utc.microsecond // 1000:03d}Z"


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclass(frozen=True, slots=True)
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
        return out


class _BatchWriter:
    """A structlog logger that batches rendered lines in memory.

    structlog's WriteLogger takes a lock and the sink used to flush per
    record: a lock and a syscall per request on the hot path. One task owns
    the event loop, so no lock is needed; the batch goes out when it grows
    past ``max_bytes``, when :meth:`AuditSink.flush` runs (every
    ``flush_interval`` while serving), and at shutdown.
    """

    def __init__(self, stream: IO[str], max_bytes: int) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.parts: list[str] = []
        self.size = 0

    def msg(self, message: str) -> None:
        self.parts.append(message)
        self.size += len(message) + 1
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.parts.append("")
            self.stream.write("\n".join(self.parts))
            self.parts.clear()
            self.size = 0
        self.stream.flush()


class AuditSink:
    """Writes audit records as JSON lines to one stream (stdout or a file).

    Each record is rendered once by a structlog-style processor
    (:func:`_render_record`) and batched by a logger of our own; the audit
    stream is separate from the operational logs on stderr.
    """

    flush_interval = 0.25  # seconds: how stale a record on disk may be

    def __init__(self, stream: IO[str], *, max_batch_bytes: int = 65536) -> None:
        self._stream = stream
        self._writer = _BatchWriter(stream, max_batch_bytes)
        self.records_written = 0

    @classmethod
    def open(cls, target: str) -> AuditSink:
        """``-`` is stdout; anything else is a file opened for append."""
        if target == "-":
            return cls(sys.stdout)
        try:
            stream = open(target, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            from proxy.errors import UsageError

            raise UsageError(f"cannot open audit log {target!r}: {exc.strerror}") from exc
        return cls(stream)

    def emit(self, record: AuditRecord) -> None:
        # The structlog processor renders; calling it directly skips the
        # bound logger's per-call dict copies (measured: 13 -> 8 us a record).
        self._writer.msg(_render_record(None, "msg", {"record": record}))
        self.records_written += 1

    def flush(self) -> None:
        # A closed stdout must not take the sidecar down.
        with contextlib.suppress(OSError, ValueError):
            self._writer.flush()

    async def flush_forever(self) -> None:
        """Run while serving: the batch reaches its stream at least this often."""
        import trio

        while True:
            await trio.sleep(self.flush_interval)
            self.flush()

    def close(self) -> None:
        self.flush()
        if self._stream not in (sys.stdout, sys.stderr):
            self._stream.close()


def _render_record(_logger: Any, _method: str, event_dict: Mapping[str, Any]) -> str:
    record: AuditRecord = event_dict["record"]
    return json.dumps(record.as_dict(), separators=(",", ":"), default=str)
