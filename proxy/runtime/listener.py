"""What every listener shares: binding, accept loops, the connection cap,
per-connection bookkeeping and audit records.

Theory of operation: each listener owns its accept loops; every accepted
connection runs as a task in the *handler* nursery that the caller passes
in, so shutdown can stop accepting first and then drain handlers with a
deadline. A handler never lets an exception escape (invariant 5): network
garbage ends that connection with an audit record, nothing more.
Subclasses implement :meth:`BaseListener.handle` for one connection.
"""

from __future__ import annotations

import datetime as _dt
import errno
import itertools
import math
import os
import socket
import time
from dataclasses import dataclass, field

import structlog
import trio
from cryptography import x509

from proxy.audit import AuditRecord, AuditSink, Direction, rfc3339
from proxy.audit.derive import count
from proxy.errors import UsageError
from proxy.identity import IdentitySnapshot, IdentityState, VerifiedSvid
from proxy.metrics import Metrics
from proxy.netaddr import HostPort, format_sockaddr
from proxy.runtime.reactor import Reactor
from proxy.tls import TLSHandshakeError, TLSStream
from proxy.tracing.hop import UNTRACED

log = structlog.get_logger("agent_proxy")

# Accept errors that mean "out of resources right now", not "listener dead".
_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# What trio's SocketListener.accept skips: one connection failed, not the listener.
_IGNORABLE_ACCEPT = {
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
        "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    )
    if hasattr(errno, name)
}  # fmt: skip
_conn_counter = itertools.count(1)
# Connections taken per wake-up at most (HAProxy's tune.maxaccept is 64 too):
# a storm of connects must not keep the reactor and the handlers waiting.
_ACCEPT_BATCH = 64


class ListenError(UsageError):
    """A listener cannot bind: names the listener and its address."""


def listen_error(what: str, listen: HostPort, exc: OSError, origin: str | None = None) -> str:
    """``cannot listen on inbound 'hr' 127.0.0.1:18443: Address already in use``."""
    where = f" ({origin})" if origin else ""
    address = str(listen) if listen.host else f"*:{listen.port}"
    return f"cannot listen on {what} {address}{where}: {exc.strerror or exc}"


def new_conn_id() -> str:
    return f"{os.getpid():x}-{next(_conn_counter):x}"


@dataclass
class Conn:
    """What one connection's audit records share."""

    conn_id: str
    snapshot: IdentitySnapshot
    peer_addr: str | None
    client_addr: str | None = None  # outbound: the local agent's address
    tls: TLSStream | None = None
    started: float = 0.0
    # Continuous authentication, in trio time: when the peer's certificate
    # expires and when max_connection_lifetime runs out.
    cert_deadline: float = math.inf
    lifetime_deadline: float = math.inf
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # The verified peer's (id, serial, notAfter) as records write them: the
    # same for every record of the connection, so rendered once.
    peer_fields: tuple[str, str, str] | None = None

    def end_reason(self) -> str:
        """Why a cancelled connection ended, for its close record."""
        now = trio.current_time()
        if now >= self.cert_deadline:
            return "peer_certificate_expired"
        if now >= self.lifetime_deadline:
            return "max_lifetime"
        return "shutdown"


class BaseListener:
    refuses_when_audit_fails = True  # on_failure = "closed": refuse the connection

    def __init__(
        self,
        *,
        name: str,
        direction: Direction,
        listen: HostPort,
        target_label: str,
        max_connections: int,
        handshake_timeout: float,
        identity: IdentityState,
        audit: AuditSink,
        max_lifetime: float | None = None,
        graceful_lifetime: bool = False,
    ) -> None:
        self.name = name
        self.direction: Direction = direction
        self.listen = listen
        self.target_label = target_label
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.identity = identity
        self.audit = audit
        self.max_lifetime = max_lifetime
        # HTTP ends a connection that outlived its lifetime between exchanges;
        # TCP has no such boundary and is cut at the deadline.
        self.graceful_lifetime = graceful_lifetime
        self.active = 0
        self.bound: list[str] = []
        self.metrics: Metrics | None = None
        self.tracer = UNTRACED  # the plan sets the process's tracer
        self.reactor: Reactor | None = None  # the process's, for established TCP pairs
        # How the operator named this listener, for a bind error ("--listen").
        self.origin: str | None = None
        self._peer_memo: tuple[VerifiedSvid, tuple[str, str, str], _dt.datetime] | None = None

    def _reactor(self) -> Reactor | None:
        """The process's reactor, as it is now (HTTP sessions ask per answer)."""
        return self.reactor

    # -- audit ------------------------------------------------------------

    def record(self, conn: Conn, event: str, decision: str, reason: str, **extra: object) -> None:
        peer_id = serial = not_after = rule = None
        if conn.tls is not None:
            fields = conn.peer_fields
            if fields is None and (verified := conn.tls.peer.verified) is not None:
                fields = conn.peer_fields = self._peer_view(verified)[0]
            if fields is not None:
                peer_id, serial, not_after = fields
            peer_decision = conn.tls.peer.decision
            if peer_decision is not None and peer_decision.allowed:
                rule = peer_decision.rule
        for key in ("peer_id", "peer_cert_serial", "peer_cert_not_after", "rule"):
            if key in extra:  # per-request records override the connection's view
                value = extra.pop(key)
                if key == "peer_id":
                    peer_id = value  # type: ignore[assignment]
                elif key == "peer_cert_serial":
                    serial = value  # type: ignore[assignment]
                elif key == "peer_cert_not_after":
                    not_after = value  # type: ignore[assignment]
                else:
                    rule = value  # type: ignore[assignment]
        if conn.client_addr is not None:
            extra["client_addr"] = conn.client_addr
        record = AuditRecord(
            event=event,
            direction=self.direction,
            decision="allow" if decision == "allow" else "deny",
            reason=reason,
            listener=self.name,
            conn_id=conn.conn_id,
            rule=rule,
            peer_id=peer_id,
            local_id=conn.snapshot.local_id,
            # Outbound requests name the upstream they went to.
            peer_addr=_text(extra.pop("peer_addr", None)) or conn.peer_addr,
            target=str(extra.pop("target", self.target_label)),
            peer_cert_serial=serial,
            peer_cert_not_after=not_after,
            trace_id=_text(extra.pop("trace_id", None)),  # HTTP: the request's span
            span_id=_text(extra.pop("span_id", None)),
            extra={k: v for k, v in extra.items() if v is not None},
        )
        self.audit.emit(record)
        if self.metrics is not None:
            count(self.metrics, record)  # metrics from the record, not event names
        if event != "mcp.call":  # its http.request follows and commits both
            self.audit.commit()  # barrier: the effect this record describes comes next

    # -- accepting --------------------------------------------------------

    async def serve(
        self,
        handlers: trio.Nursery,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            # An empty host (":8443") is every address, IPv4 and IPv6.
            listeners = await trio.open_tcp_listeners(
                self.listen.port, host=self.listen.host or None
            )
        except OSError as exc:
            what = f"{self.direction} {self.name!r}"
            raise ListenError(listen_error(what, self.listen, exc, self.origin)) from None
        self.bound = [format_sockaddr(sock.socket.getsockname()) for sock in listeners]
        log.info(
            "listening",
            listener=self.name,
            direction=self.direction,
            address=self.bound[0],
            addresses=self.bound,
            target=self.target_label,
        )
        task_status.started(self.bound)
        async with trio.open_nursery() as accepting:
            accepting.start_soon(self.background)
            for listener in listeners:
                accepting.start_soon(self._accept_loop, listener, handlers)

    async def background(self) -> None:
        """Per-listener housekeeping (pool sweeping); runs while accepting."""

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        # Accepts on a duplicate of the listening socket's fd (the same open
        # file, so the same queue and non-blocking mode): up to a batch of
        # the connections already queued is taken in one wake-up, where
        # trio's accept() takes one and then yields to the scheduler (a
        # round per connection).
        async with listener:
            sock = socket.socket(fileno=os.dup(listener.socket.fileno()))
            try:
                sock.setblocking(False)
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    for _ in range(_ACCEPT_BATCH):
                        try:
                            accepted, address = sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:
                            if exc.errno in _IGNORABLE_ACCEPT:
                                continue  # that connection is gone; the next may be there
                            if exc.errno in _TRANSIENT_ACCEPT:
                                log.error(
                                    "accept failed; backing off",
                                    listener=self.name,
                                    error=os.strerror(exc.errno or 0),
                                )
                                await trio.sleep(0.1)
                                break
                            raise
                        # SocketStream sets TCP_NODELAY, as trio's accept() does.
                        stream = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
                        # accept() has the peer's address: no getpeername per connection.
                        handlers.start_soon(self._handle, stream, format_sockaddr(address))
            finally:
                trio.lowlevel.notify_closing(sock)  # trio forgets the fd before it is reused
                sock.close()

    async def _handle(self, stream: trio.SocketStream, peer_addr: str | None) -> None:
        conn = Conn(new_conn_id(), self.identity.current, peer_addr, started=time.monotonic())
        refusal = None
        if self.active >= self.max_connections:
            refusal = "connection_limit"
        elif conn.snapshot.expired(_dt.datetime.now(_dt.UTC)):
            # Fail closed: with our SVID expired we present nothing.
            refusal = "own_svid_expired"
        elif self.refuses_when_audit_fails and not self.audit.accepting():
            refusal = "audit_unavailable"  # fail closed: no record could be written
        if refusal is not None:
            self.record(conn, "connection.refused", "deny", refusal, outcome="denied")
            await stream.aclose()
            return
        if self.max_lifetime is not None:
            conn.lifetime_deadline = trio.current_time() + self.max_lifetime
            if not self.graceful_lifetime:
                conn.scope.deadline = conn.lifetime_deadline
        self.active += 1
        if self.metrics is not None:
            self.metrics.active(self.name, 1)
        try:
            with conn.scope:
                await self.handle(stream, conn)
        except Exception as exc:  # invariant 5: one connection's failure is never fatal
            log.exception("connection handler failed", listener=self.name, conn_id=conn.conn_id)
            try:
                self.record(
                    conn, "connection.close", "deny", "internal_error", error=type(exc).__name__
                )
            except Exception:
                log.exception("cannot write audit record", conn_id=conn.conn_id)
        finally:
            self.active -= 1
            if self.metrics is not None:
                self.metrics.active(self.name, -1)
            # TLS first: close_notify must reach the peer before the socket
            # under it closes. Nothing here waits (close_notify is one
            # non-blocking attempt), so a peer that reads nothing cannot hold
            # the close and a cancelled handler still closes everything:
            # no shield, no deadline, no checkpoint at the handler's end.
            if conn.tls is not None:
                conn.tls.close_now()
            stream.socket.close()

    async def handle(self, stream: trio.SocketStream, conn: Conn) -> None:
        raise NotImplementedError

    async def handshake(self, conn: Conn) -> bool:
        """Run ``conn.tls``'s handshake under the deadline; audit a refusal."""
        assert conn.tls is not None
        failure = await handshake_within(conn.tls, self.handshake_timeout)
        if failure is None:
            self.arm_peer_expiry(conn)
            return True
        reason, detail = failure
        decision = conn.tls.peer.decision
        if (
            self.direction == "outbound"
            and decision is not None
            and decision.allowed
            and reason in ("tls_error", "no_peer_certificate")
        ):
            # We had accepted the upstream's SVID; what ended the handshake
            # after that is the upstream judging ours (an alert, or a close).
            reason, detail = "refused_by_upstream", f"upstream refused us: {detail}"
        if reason == "refused_by_upstream":  # our policy allowed; the far side did not
            self.record(conn, "connection.refused", "allow", reason, outcome=reason, error=detail)
        else:
            self.record(
                conn,
                "connection.refused",
                "deny",
                reason,
                outcome="denied",
                error=detail,
                **_presented(conn.tls.peer.presented),
            )
        return False

    def _peer_view(self, verified: VerifiedSvid) -> tuple[tuple[str, str, str], _dt.datetime]:
        """What records write of a verified peer, and when its chain expires.
        Handshakes that present the same chain share one VerifiedSvid
        (proxy.tls.peercheck.PathCache), so the last one's view is kept: an
        identity check (the memo holds the object, so its id stays its own)
        instead of rendering the same fields on every connection."""
        memo = self._peer_memo
        if memo is not None and memo[0] is verified:
            return memo[1], memo[2]
        fields = (str(verified.spiffe_id), verified.serial_hex, rfc3339(verified.not_after))
        not_after = min(cert.not_valid_after_utc for cert in verified.chain)
        self._peer_memo = (verified, fields, not_after)
        return fields, not_after

    def arm_peer_expiry(self, conn: Conn) -> None:
        """Close the connection the moment the peer's certificate (or any
        certificate in its verified chain) expires."""
        assert conn.tls is not None
        verified = conn.tls.peer.verified
        if verified is None:
            return
        not_after = self._peer_view(verified)[1]
        remaining = (not_after - _dt.datetime.now(_dt.UTC)).total_seconds()
        conn.cert_deadline = trio.current_time() + max(0.0, remaining)
        conn.scope.deadline = min(conn.scope.deadline, conn.cert_deadline)


async def handshake_within(tls: TLSStream, timeout: float) -> tuple[str, str] | None:
    """Run a handshake under its deadline: None, or (audit reason, detail)."""
    with trio.move_on_after(timeout) as scope:
        try:
            await tls.do_handshake()
        except TLSHandshakeError as exc:
            return exc.reason, exc.message
    if scope.cancelled_caught:
        return "handshake_timeout", f"no TLS handshake within {timeout:g}s"
    return None


def _presented(leaf: x509.Certificate | None) -> dict[str, str]:
    """Whose certificate OpenSSL refused (unverified: for the operator)."""
    if leaf is None:
        return {}
    fields = {
        "peer_cert_serial": format(leaf.serial_number, "x"),
        "peer_cert_not_after": rfc3339(leaf.not_valid_after_utc),
    }
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except (x509.ExtensionNotFound, ValueError):
        uris = []
    if len(uris) == 1 and uris[0].startswith("spiffe://"):
        fields["peer_id"] = uris[0]
    return fields


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
