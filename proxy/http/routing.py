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
) -> Request:
    """The request head the upstream gets: hop-by-hop and identity fields
    gone, ours added, the normalised target that policy judged."""
    headers = forwardable(
        request.headers,
        # An X-Request-Id we did not take (invalid) is replaced, not doubled.
        strip=routed.strip | ({b"expect", REQUEST_ID} if generated_id else {b"expect"}),
        keep_upgrade=upgrade and routed.allow_upgrade,
    )
    if is_chunked(request.headers):
        headers.append((b"transfer-encoding", b"chunked"))
    # The client's fields passed the parser's strict checks already; what we
    # add (identity, trace context, credentials from a token endpoint) and
    # the target we built are checked here, once, as h11 would check them.
    _check_ours(routed.target, routed.add_headers)
    headers.extend(routed.add_headers)
    if generated_id:
        headers.append((REQUEST_ID, outcome.request_id.encode()))
    return Request(request.method, routed.target, Fields(headers))


def _check_ours(target: bytes, fields: Sequence[Header]) -> None:
    if not writable_target(target):
        raise WriteError(f"illegal request target {target!r}")
    for name, value in fields:
        if not writable_field(name, value):
            raise WriteError(f"illegal header field {name!r}: {value!r}")


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
