"""One HTTP exchange as a state machine (pure, no I/O).

Theory of operation. In the manner of h11's ``_state.py``, the life of one
request on a client connection is a small set of states and the events that
move between them, written down as a table (:data:`TRANSITIONS`) that can be
read top to bottom:

* ``IDLE``: waiting for a request head (between requests on a keep-alive
  connection).
* ``ROUTING``: the head is in; the router and policy judge it (again after
  ``BUFFERING``, with the body's hash or parsed calls).
* ``BUFFERING``: the verdict needs the whole body first (an agent-protocol
  POST judged per JSON-RPC call, a high-impact action bound to its body).
* ``CONNECTING``: allowed; waiting for an upstream connection from the pool.
* ``RELAYING``: the request (head, then body as it streams) goes upstream;
  no answer has reached the client yet, so a failure can still be answered.
* ``RESPONDING``: the upstream's answer is on its way to the client; a
  failure now can only end the connection.
* ``ANSWERING``: we answer ourselves (a denial, the client's error, an
  upstream we could not use).
* ``TUNNEL``: a 101 switched protocols; bytes are relayed raw until either
  side closes.
* ``DONE``: the exchange is complete and the connection may carry another.
* ``CLOSED``: the connection ends after this exchange.

The driver (:mod:`proxy.http.session` and :mod:`proxy.http.relay`) does the
I/O and reports what happened with :meth:`Exchange.on`; an event the table
does not allow in the current state is a :class:`LocalProtocolError`: *we*
got the order wrong, a bug, never the peer's doing. What the peer got
wrong (malformed input, a stall, a broken connection) is a
:class:`PeerError`, which carries the status to answer with (0: nothing to
answer) and the audit reason. That split is h11's Local/RemoteProtocolError.

The exchange also holds the request's audit outcome (:class:`RequestOutcome`)
and says, from it, what actually happened (:func:`classify`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.http.headers import Header


class State(enum.Enum):
    # Members are singletons compared by identity, so identity hashing is
    # exact; Enum's own __hash__ (hash of the name) is a Python call, and
    # every Exchange.on looks up a (State, Ev) key: two per event, six or
    # more events per request.
    __hash__ = object.__hash__

    IDLE = "idle"
    ROUTING = "routing"
    BUFFERING = "buffering"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    RESPONDING = "responding"
    ANSWERING = "answering"
    TUNNEL = "tunnel"
    DONE = "done"
    CLOSED = "closed"


class Ev(enum.Enum):
    __hash__ = object.__hash__  # as State's

    REQUEST_HEAD = "request_head"  # a complete, strictly checked request head
    NEED_BODY = "need_body"  # the verdict needs the whole body first
    BODY_READ = "body_read"  # ...and here it is
    ALLOWED = "allowed"  # policy allowed: get an upstream
    REFUSED = "refused"  # policy or the router refused, or the client erred: answer
    UPSTREAM_READY = "upstream_ready"
    UPSTREAM_FAILED = "upstream_failed"  # connect, TLS, identity: answer 502/504
    RESPONSE_HEAD = "response_head"  # the upstream's final answer started toward the client
    SWITCHED = "switched"  # a 101 went to the client
    FAILED = "failed"  # a peer broke the exchange (either side)
    ANSWERED = "answered"  # our own answer is written
    RESPONSE_END = "response_end"  # the whole answer reached the client
    KEEP = "keep"  # both messages complete and both sides allow another
    CLOSE = "close"  # the connection ends here


# (state, event) -> next state. Anything absent is a LocalProtocolError.
TRANSITIONS: dict[tuple[State, Ev], State] = {
    (State.IDLE, Ev.REQUEST_HEAD): State.ROUTING,
    (State.IDLE, Ev.REFUSED): State.ANSWERING,  # a head we could not read
    (State.ROUTING, Ev.NEED_BODY): State.BUFFERING,
    (State.ROUTING, Ev.ALLOWED): State.CONNECTING,
    (State.ROUTING, Ev.REFUSED): State.ANSWERING,
    (State.BUFFERING, Ev.BODY_READ): State.ROUTING,
    (State.BUFFERING, Ev.REFUSED): State.ANSWERING,  # body too large, malformed
    (State.BUFFERING, Ev.ANSWERED): State.DONE,  # judged and answered in the protocol's terms
    (State.BUFFERING, Ev.FAILED): State.CLOSED,
    (State.CONNECTING, Ev.UPSTREAM_READY): State.RELAYING,
    (State.CONNECTING, Ev.UPSTREAM_FAILED): State.ANSWERING,
    (State.CONNECTING, Ev.REFUSED): State.ANSWERING,  # the client's framing broke first
    (State.RELAYING, Ev.RESPONSE_HEAD): State.RESPONDING,
    (State.RELAYING, Ev.SWITCHED): State.TUNNEL,
    (State.RELAYING, Ev.FAILED): State.ANSWERING,  # nothing sent yet: say why
    (State.RESPONDING, Ev.RESPONSE_END): State.DONE,
    (State.RESPONDING, Ev.FAILED): State.CLOSED,  # mid-answer: nothing more to say
    (State.ANSWERING, Ev.ANSWERED): State.DONE,
    (State.TUNNEL, Ev.CLOSE): State.CLOSED,
    (State.DONE, Ev.KEEP): State.IDLE,
    (State.DONE, Ev.CLOSE): State.CLOSED,
}
# The client may vanish at any point of an exchange.
for _state in State:
    if _state is not State.CLOSED:
        TRANSITIONS.setdefault((_state, Ev.CLOSE), State.CLOSED)


class PeerError(Exception):
    """The peer did it: malformed input, a stall, a broken connection.
    ``status`` is the answer to give if we still can (0: none), ``reason``
    the audit reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class LocalProtocolError(Exception):
    """We did it: the driver reported an event the state table does not
    allow. A bug, ending one connection (audited ``internal_error``)."""


@dataclass
class RequestOutcome:
    """The audit view of one exchange, filled in as it goes."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    decision: str = "deny"
    reason: str = ""
    rule: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_peer: str | None = None
    upstream_serial: str | None = None
    upstream_not_after: str | None = None
    upstream_addr: str | None = None
    error: str | None = None
    target: str | None = None
    outcome: str = ""  # what happened (served, denied...), next to the policy's decision
    extra: dict[str, object] = field(default_factory=dict)
    reply_headers: Sequence[Header] = ()
    calls: list[dict[str, object]] = field(default_factory=list)  # MCP: one per JSON-RPC call

    @property
    def duration_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def failed(self, error: PeerError) -> None:
        self.reason, self.error = error.reason, error.message


class Exchange:
    """One request's state, moved only through :data:`TRANSITIONS`."""

    __slots__ = ("history", "outcome", "state")

    def __init__(self, outcome: RequestOutcome) -> None:
        self.state = State.IDLE
        self.outcome = outcome
        self.history: list[State] = [State.IDLE]

    def on(self, event: Ev) -> State:
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise LocalProtocolError(
                f"event {event.value} is not allowed in state {self.state.value}"
            ) from None
        self.history.append(self.state)
        return self.state

    @property
    def answer_started(self) -> bool:
        """Whether any part of an answer may have reached the client."""
        return State.RESPONDING in self.history or State.TUNNEL in self.history


# Why an exchange may end its connection, carried to the close record.
CONNECTION_ENDERS = frozenset({"client_reset", "write_timeout"})
# Audit reasons by what they say happened (see :func:`classify`).
CLIENT_ERRORS = frozenset(
    {
        "bad_request",
        "bad_path",
        "header_too_large",
        "request_timeout",
        "body_too_large",
        "unsupported_transfer_encoding",
        "client_reset",
        "write_timeout",
        "bad_jsonrpc",
        "mcp_header_mismatch",
        "unknown_method",
        "invalid_params",
    }
)
UPSTREAM_ERRORS = frozenset(
    {
        "bad_upstream_response",
        "unfilterable_response",
        "target_unreachable",
        "target_connect_timeout",
        "handshake_timeout",
        "tls_error",
        "tls_version_refused",
    }
)


def classify(outcome: RequestOutcome) -> str:
    """What actually happened to a request, next to what policy decided:

    ``served`` (an upstream answered, whatever its status), ``denied`` (our
    policy refused), ``refused_by_upstream`` (the upstream refused our
    identity in its handshake), ``upstream_untrusted`` (we refused the
    upstream's identity), ``upstream_error`` (connect, TLS, timeout, reset,
    bad answer), ``client_error`` (malformed or stalled input, the client
    left or stopped reading).
    """
    if outcome.outcome:
        return outcome.outcome  # set where the cause was known first-hand
    reason = outcome.reason
    if reason == "upstream_refused":
        return "refused_by_upstream"
    if reason in CLIENT_ERRORS:
        return "client_error"
    if reason in UPSTREAM_ERRORS or reason.startswith("upstream_"):
        return "upstream_error"
    if outcome.decision == "allow":
        return "served"
    return "denied"
