"""What the exchange asks of a listener: route and judge one request head.

A :class:`Router` (one per inbound connection, or per outbound listener)
turns a request head into a :class:`Routed`: where it goes, which headers
to strip and add, and the verdict, or a continuation when the verdict needs
the body first.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.http.agent_hook import AgentHook
from proxy.http.exchange import RequestOutcome
from proxy.http.headers import REQUEST_ID, Header, forwardable, is_chunked
from proxy.http.llhttp_head import writable_field, writable_target
from proxy.http.wire import Fields, Request
from proxy.http.writer import WriteError
from proxy.policy.verdict import RequestVerdict


@dataclass
class Routed:
    """The router's answer for one request."""

    decision: RequestVerdict  # status, client headers and audit fields included
    path: str = ""
    key: Hashable | None = None  # pool key of the upstream; None when denied
    target: bytes = b""  # request-target to send upstream (origin-form, normalised)
    add_headers: Sequence[Header] = ()
    strip: frozenset[bytes] = frozenset()
    allow_upgrade: bool = False
    label: str | None = None  # where it was going, for the audit record
    # Set when the decision needs the whole body first (a high-impact action
    # binds the body's hash): call with the SHA-256 hex of the body.
    finish: Callable[[str], Routed] | None = None
    max_body: int = 1 << 20
    hook: AgentHook | None = None  # an agent protocol judges the body per call
    high_impact: bool = False  # a high_impact rule allowed it: durable decision first


def upstream_request_for(
    request: Request,
    routed: Routed,
    upgrade: bool,
    generated_id: bool,
    outcome: RequestOutcome,
    trace: Sequence[Header] = (),
) -> Request:
    """The request head the upstream gets: hop-by-hop and identity fields
    gone, ours added, the normalised target that policy judged. ``trace``:
    our span's context (:func:`proxy.tracing.context.outgoing`), added
    after the router's fields."""
    # Names lower-case: request.headers are.
    headers = forwardable(
        request.headers,
        # An X-Request-Id we did not take (invalid) is replaced, not doubled.
        strip=routed.strip | ({b"expect", REQUEST_ID} if generated_id else {b"expect"}),
        keep_upgrade=upgrade and routed.allow_upgrade,
        names=request.names,
    )
    names = request.names
    if (names is None or b"transfer-encoding" in names) and is_chunked(request.headers):
        headers.append((b"transfer-encoding", b"chunked"))
    # The client's fields passed the parser's strict checks already; what we
    # add (identity, trace context, credentials from a token endpoint) and
    # the target we built are checked here, once, as h11 would check them.
    if not writable_target(routed.target):
        raise WriteError(f"illegal request target {routed.target!r}")
    added = routed.add_headers
    ours = [_CHECKED[f] if f in _CHECKED else _check(f) for f in added] if added else []
    if trace:
        # traceparent is made of ids and flags we checked or made (hex):
        # valid as built; tracestate echoes the caller's members, so it is
        # checked like the router's fields.
        ours.extend([f if f[0] == b"traceparent" else _check(f) for f in trace])
    if generated_id:
        ours.append((REQUEST_ID, outcome.request_id.encode()))
    raw = [*headers, *added, *trace, *ours[len(added) + len(trace) :]]
    headers.extend(ours)
    return Request(request.method, routed.target, Fields(headers, raw))


# Fields we add that passed the check, each to its lower-cased form: the
# router's fields repeat (XFCC per connection, a credential until it is
# renewed), so each is checked once, not per request. Bounded: cleared when
# full (a busy inbound listener sees one XFCC value per peer certificate).
_CHECKED: dict[Header, Header] = {}
_CHECKED_MAX = 1024


def _check(field: Header) -> Header:
    name, value = field
    if not writable_field(name, value):
        raise WriteError(f"illegal header field {name!r}: {value!r}")
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    lowered = _CHECKED[field] = (name.lower(), value)
    return lowered


class Router(Protocol):
    def route(self, request: Request, upgrade: bool) -> Routed: ...


class UpstreamFailure(Exception):
    """Could not get an upstream connection (connect, TLS, identity)."""

    def __init__(self, status: int, reason: str, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.peer_id = peer_id
