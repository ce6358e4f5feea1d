"""TCP-mode listeners: terminate mTLS in front of a local target (inbound),
or originate mTLS for a local agent (outbound), and relay bytes.

Theory of operation: each listener owns its accept loops; every accepted
connection runs as a task in the *handler* nursery that the caller passes
in, so shutdown can stop accepting first and then drain handlers with a
deadline. A handler never lets an exception escape (invariant 5): network
garbage ends that connection with an audit record, nothing more.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import time
from dataclasses import dataclass

import structlog
import trio

from proxy.audit import AuditRecord, AuditSink, Direction, rfc3339
from proxy.netaddr import HostPort, format_sockaddr
from proxy.policy import SpiffePattern, decide_peer
from proxy.runtime.identity_state import IdentitySnapshot, IdentityState, SideCache
from proxy.runtime.relay import RelayStats, relay
from proxy.tls import TLSHandshakeError, TlsSide, TLSStream, TlsVersion, build_side

log = structlog.get_logger("agent_proxy")

# Accept errors that mean "out of resources right now", not "listener dead".
_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class L4Config:
    name: str
    direction: Direction
    listen: HostPort
    target: HostPort
    patterns: tuple[SpiffePattern, ...]  # inbound: allowed peers; outbound: expected upstream
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_connections: int = 4096
    min_tls: TlsVersion = "1.3"


_conn_counter = itertools.count(1)


@dataclass
class _Conn:
    """What one connection's audit records share."""

    conn_id: str
    snapshot: IdentitySnapshot
    peer_addr: str | None
    client_addr: str | None = None  # outbound: the local agent's address
    tls: TLSStream | None = None
    started: float = 0.0


def _new_conn_id() -> str:
    return f"{os.getpid():x}-{next(_conn_counter):x}"


class L4Listener:
    def __init__(self, config: L4Config, identity: IdentityState, audit: AuditSink) -> None:
        self.config = config
        self.audit = audit
        self.active = 0
        self.bound: list[str] = []
        patterns = config.patterns

        def build(snapshot: IdentitySnapshot) -> TlsSide:
            return build_side(
                snapshot.svid,
                snapshot.bundles,
                lambda peer: decide_peer(peer, patterns),
                server=config.direction == "inbound",
                min_version=config.min_tls,
            )

        self._sides = SideCache(identity, build)

    def _record(self, conn: _Conn, event: str, decision: str, reason: str, **extra: object) -> None:
        peer_id = serial = not_after = rule = None
        if conn.tls is not None:
            verified = conn.tls.peer.verified
            if verified is not None:
                peer_id = str(verified.spiffe_id)
                serial = verified.serial_hex
                not_after = rfc3339(verified.not_after)
            peer_decision = conn.tls.peer.decision
            if peer_decision is not None and peer_decision.allowed:
                rule = peer_decision.rule
        if conn.client_addr is not None:
            extra["client_addr"] = conn.client_addr
        self.audit.emit(
            AuditRecord(
                event=event,
                direction=self.config.direction,
                decision="allow" if decision == "allow" else "deny",
                reason=reason,
                listener=self.config.name,
                conn_id=conn.conn_id,
                rule=rule,
                peer_id=peer_id,
                local_id=conn.snapshot.local_id,
                peer_addr=conn.peer_addr,
                target=str(self.config.target),
                peer_cert_serial=serial,
                peer_cert_not_after=not_after,
                extra={k: v for k, v in extra.items() if v is not None},
            )
        )

    # -- accept loop ------------------------------------------------------

    async def serve(
        self,
        handlers: trio.Nursery,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listen = self.config.listen
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        self.bound = [format_sockaddr(sock.socket.getsockname()) for sock in listeners]
        log.info(
            "listening",
            listener=self.config.name,
            direction=self.config.direction,
            address=self.bound[0],
            addresses=self.bound,
            target=str(self.config.target),
        )
        task_status.started(self.bound)
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(self._accept_loop, listener, handlers)

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in _TRANSIENT_ACCEPT:
                        log.error(
                            "accept failed; backing off",
                            listener=self.config.name,
                            error=os.strerror(exc.errno or 0),
                        )
                        await trio.sleep(0.1)
                        continue
                    raise
                handlers.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer_addr: str | None = format_sockaddr(stream.socket.getpeername())
        except OSError:
            peer_addr = None
        snapshot, side = self._sides.current()
        conn = _Conn(_new_conn_id(), snapshot, peer_addr, started=time.monotonic())
        if self.active >= self.config.max_connections:
            self._record(conn, "connection.refused", "deny", "connection_limit")
            await stream.aclose()
            return
        self.active += 1
        try:
            if self.config.direction == "inbound":
                await self._inbound(stream, conn, side)
            else:
                await self._outbound(stream, conn, side)
        except Exception as exc:  # invariant 5: one connection's failure is never fatal
            log.exception(
                "connection handler failed", listener=self.config.name, conn_id=conn.conn_id
            )
            try:
                self._record(
                    conn, "connection.close", "deny", "internal_error", error=type(exc).__name__
                )
            except Exception:
                log.exception("cannot write audit record", conn_id=conn.conn_id)
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()
                if conn.tls is not None:
                    await conn.tls.aclose()

    async def _handshake(self, conn: _Conn) -> bool:
        assert conn.tls is not None
        reason = message = None
        with trio.move_on_after(self.config.handshake_timeout) as scope:
            try:
                await conn.tls.do_handshake()
            except TLSHandshakeError as exc:
                reason, message = exc.reason, exc.message
        if scope.cancelled_caught:
            reason = "handshake_timeout"
            message = f"no TLS handshake within {self.config.handshake_timeout:g}s"
        if reason is None:
            return True
        self._record(conn, "connection.refused", "deny", reason, error=message)
        return False

    async def _connect_target(self) -> trio.SocketStream | tuple[str, str]:
        target = self.config.target
        with trio.move_on_after(self.config.connect_timeout):
            try:
                return await trio.open_tcp_stream(target.host, target.port)
            except OSError as exc:
                return "target_unreachable", str(exc.strerror or exc)
        return "target_connect_timeout", f"no connection within {self.config.connect_timeout:g}s"

    async def _inbound(self, stream: trio.SocketStream, conn: _Conn, side: TlsSide) -> None:
        conn.tls = TLSStream(stream, side)
        if not await self._handshake(conn):
            return
        target = await self._connect_target()
        if isinstance(target, tuple):
            self._record(
                conn,
                "connection.close",
                "allow",
                target[0],
                error=target[1],
                bytes_up=0,
                bytes_down=0,
                duration_ms=_ms(conn.started),
            )
            return
        self._record(conn, "connection.open", "allow", "peer_allowed")
        async with target:
            await self._relay(conn, conn.tls, target)

    async def _outbound(self, stream: trio.SocketStream, conn: _Conn, side: TlsSide) -> None:
        # For outbound the TLS peer is the upstream; the agent is the client.
        conn.client_addr, conn.peer_addr = conn.peer_addr, str(self.config.target)
        target = await self._connect_target()
        if isinstance(target, tuple):
            self._record(conn, "connection.refused", "deny", target[0], error=target[1])
            return
        with contextlib.suppress(OSError):
            conn.peer_addr = format_sockaddr(target.socket.getpeername())
        conn.tls = TLSStream(target, side)
        if not await self._handshake(conn):
            return
        self._record(conn, "connection.open", "allow", "peer_allowed")
        await self._relay(conn, stream, conn.tls)

    async def _relay(self, conn: _Conn, accepted: trio.abc.Stream, far: trio.abc.Stream) -> None:
        # The close record is written even when shutdown cancels the relay.
        stats = RelayStats()
        finished = False
        try:
            await relay(accepted, far, stats)
            finished = True
        finally:
            reason = stats.error or ("closed" if finished else "shutdown")
            self._record(
                conn,
                "connection.close",
                "allow",
                reason,
                bytes_up=stats.bytes_up,
                bytes_down=stats.bytes_down,
                duration_ms=_ms(conn.started),
            )


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
