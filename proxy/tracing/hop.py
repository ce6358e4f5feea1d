"""One request's span at this sidecar: where the HTTP session meets tracing.

Theory of operation: the listener hands its session a :class:`Hop` (the
process's tracer, the span kind, who we are and who the peer is). For each
request the session calls :meth:`Hop.start` with the request's headers: the
caller's W3C context (``traceparent``/``tracestate``), when valid, is the
parent; without one a new trace starts here (the egress starts the trace an
agent did not). The session then forwards our span's context instead of the
client's (:data:`TRACE_FIELDS` are stripped, :func:`outgoing` added), puts
:func:`record_ids` on every audit record of the request, and calls
:meth:`Hop.end` when the records are emitted. With export off the same ids
are made and propagated; only the OpenTelemetry span is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.tracing.context import incoming
from proxy.tracing.export import Span, Tracer, span_attributes

# The client's trace context: never forwarded as sent, ours replaces it.
TRACE_FIELDS = frozenset({b"traceparent", b"tracestate"})

# What a listener without a tracer uses: ids and propagation, no export.
UNTRACED = Tracer()


@dataclass(frozen=True, slots=True)
class Hop:
    tracer: Tracer = UNTRACED
    server: bool = True  # inbound: a server span; the egress: a client span
    local_id: str | None = None
    peer_id: str | None = None  # inbound: the verified caller (outbound: per request)

    def start(
        self,
        method: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        names: frozenset[bytes] | None = None,
    ) -> Span:
        """``headers``: the request's fields, names lower-case (as
        :class:`~proxy.http.wire.Fields` has them); ``names``, when known,
        the set of them (no traceparent there: no context to look for)."""
        if names is not None and b"traceparent" not in names:
            parent = None
        else:
            parent = incoming(headers, names_lowered=True)
        return self.tracer.start_span(method or "HTTP", server=self.server, parent=parent)

    def end(
        self,
        span: Span,
        record: Mapping[str, Any],
        calls: Iterable[Mapping[str, Any]] = (),
        *,
        error: str | None = None,
    ) -> None:
        """End ``span`` with the attributes of its request's record (and of
        its agent-protocol calls: tools and methods, comma-separated)."""
        if span.otel is None:
            return  # export off: nothing to build
        fields = {"local_id": self.local_id, "peer_id": self.peer_id, **record}
        for key in ("tool", "mcp_method", "a2a_method"):
            names = dict.fromkeys(str(c[key]) for c in calls if c.get(key))
            if names:
                fields[key] = ",".join(names)
        self.tracer.end_span(span, attributes=span_attributes(fields), error=error)


def record_ids(span: Span) -> dict[str, str]:
    """The ``trace_id``/``span_id`` fields of every record of the span's request."""
    return {"trace_id": span.context.trace_id, "span_id": span.context.span_id}
