"""TCP-mode listeners: terminate mTLS in front of a local target (inbound),
or originate mTLS for a local agent (outbound), and relay bytes.

The peer allowlist is read on every handshake (``set_policy`` swaps it on a
reload), so a revoked peer's next handshake is refused. On the outbound, an
upstream that refuses our identity does so with a TLS alert; in TLS 1.3 the
client's handshake is complete before the server has judged its
certificate, so the alert arrives on the first read and is reported as
``refused_by_upstream``, not as a reset.

Every record carries ``outcome`` (what happened) next to ``decision`` (what
our policy said): ``served``, ``denied``, ``refused_by_upstream``,
``upstream_error``, ``client_error``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import select
import socket
from dataclasses import dataclass
from typing import Any

import trio

from proxy.audit import AuditSink, Direction
from proxy.identity import IdentitySnapshot, IdentityState, SideCache
from proxy.netaddr import HostPort, format_sockaddr
from proxy.policy import SpiffePattern, decide_peer
from proxy.policy.evaluate import PolicySet
from proxy.runtime.listener import BaseListener, Conn, ms_since
from proxy.runtime.reactor import Reactor, RelayResult, open_reactor
from proxy.runtime.relay import RelayStats, relay
from proxy.tls import TlsSide, TLSStream, TlsVersion, build_side, peer_alert

# The trio relay instead of the process's epoll reactor (a fallback switch).
USE_REACTOR = True


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
    max_connection_lifetime: float | None = None
    write_timeout: float = 60.0


async def connect_tcp(target: HostPort, timeout: float) -> trio.SocketStream | tuple[str, str]:
    """A TCP connection, or (reason, detail) saying why not."""
    try:
        literal = _literal_address(target.host, target.port)
        if literal is not None:
            stream = await _connect_literal(*literal, timeout)
            if stream is not None:
                return stream
        else:  # a name: resolve, and happy eyeballs over its addresses
            with trio.move_on_after(timeout):
                return await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        return "target_unreachable", str(exc.strerror or exc)
    return "target_connect_timeout", f"no connection within {timeout:g}s"


def _literal_family(host: str) -> int | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


@functools.lru_cache(maxsize=64)
def _literal_address(host: str, port: int) -> tuple[int, tuple[Any, ...]] | None:
    """(family, sockaddr) of a literal address, or None for a name. A
    listener dials the same target on every connection: parsed once, and
    the sockaddr is the one trio's connect would build (numeric getaddrinfo),
    so error texts stay the same."""
    family = _literal_family(host)
    if family is None:
        return None
    try:
        socket.inet_pton(family, host)
    except OSError:  # a scoped IPv6 literal ("fe80::1%eth0"): trio resolves it
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        if family == socket.AF_INET6:
            flags |= socket.AI_V4MAPPED
        info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, flags)
        return family, tuple(info[0][4])
    return family, (host, port)


# One poll object for every "has this connect finished?" probe: register,
# poll(0), unregister cost no syscall but the poll itself (and, unlike
# select, any fd number works).
_PROBE = select.poll()


def _connected_now(raw: socket.socket) -> bool:
    fd = raw.fileno()
    try:
        _PROBE.register(fd, select.POLLOUT)
        # Only this fd's answer counts: a registration left behind must not
        # make another connect look finished.
        return any(ready == fd for ready, _ in _PROBE.poll(0))
    finally:
        with contextlib.suppress(KeyError):
            _PROBE.unregister(fd)


async def _connect_literal(
    family: int, address: tuple[Any, ...], timeout: float
) -> trio.SocketStream | None:
    """One address, one connect (None: no connection within ``timeout``).
    trio's open_tcp_stream would still run its happy-eyeballs nursery for
    it (a tenth of a new connection's CPU here), and trio's socket connect
    resolves the address again on every call. A loopback connect (the
    local target, a sidecar beside us) has completed by the time
    connect() returns EINPROGRESS: one poll(0) sees that, so neither a
    deadline scope nor a wait for writability (epoll_ctl twice, a
    scheduler round) is spent on it. Only a connect still in progress
    waits, under ``timeout``. No schedule point when none was needed: the
    caller's next step (a handshake, the relay) has its own."""
    await trio.lowlevel.checkpoint_if_cancelled()
    raw = socket.socket(family, socket.SOCK_STREAM)
    try:
        raw.setblocking(False)
        err = raw.connect_ex(address)
        if err == errno.EINPROGRESS:
            if not _connected_now(raw):
                with trio.move_on_after(timeout):
                    await trio.lowlevel.wait_writable(raw)
                if not _connected_now(raw):  # the deadline, not the connect, ended the wait
                    raw.close()
                    return None
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:  # the same text as trio's connect
                raise OSError(err, f"Error connecting to {address!r}: {os.strerror(err)}")
        elif err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        raw.close()
        raise
    # SocketStream sets TCP_NODELAY, as open_tcp_stream does.
    return trio.SocketStream(trio.socket.from_stdlib_socket(raw))


# Why a relay ended -> what happened, for the record's ``outcome``.
_OUTCOMES = {
    "closed": "served",
    "shutdown": "served",
    "max_lifetime": "served",
    "peer_certificate_expired": "served",
    "client_reset": "client_error",
    "target_reset": "upstream_error",
    "refused_by_upstream": "refused_by_upstream",
}


def _outcome(reason: str, stalled: str | None) -> str:
    if reason == "write_timeout":
        return "client_error" if stalled == "client" else "upstream_error"
    return _OUTCOMES.get(reason, "served")


@dataclass
class _Ended:
    """How a relay ended, whichever engine moved the bytes."""

    reason: str
    error: str | None
    stalled: str | None
    bytes_up: int
    bytes_down: int


class L4Listener(BaseListener):
    def __init__(self, config: L4Config, identity: IdentityState, audit: AuditSink) -> None:
        super().__init__(
            name=config.name,
            direction=config.direction,
            listen=config.listen,
            target_label=str(config.target),
            max_connections=config.max_connections,
            handshake_timeout=config.handshake_timeout,
            identity=identity,
            audit=audit,
            max_lifetime=config.max_connection_lifetime,
        )
        self.config = config
        self.patterns = config.patterns

        def build(snapshot: IdentitySnapshot) -> TlsSide:
            # Read at each handshake, not captured: a reload revokes at once.
            return build_side(
                snapshot.svid,
                snapshot.bundles,
                lambda peer: decide_peer(peer, self.patterns),
                server=config.direction == "inbound",
                min_version=config.min_tls,
            )

        self._sides = SideCache(identity, build, name=f"listener {config.name}")

    def set_policy(self, policy: PolicySet) -> None:
        """Swap the peer allowlist (hot reload): the next handshake uses it."""
        self.patterns = tuple(p for rule in policy.rules for p in rule.peers)

    async def handle(self, stream: trio.SocketStream, conn: Conn) -> None:
        conn.snapshot, side = self._sides.current()
        if self.direction == "inbound":
            await self._inbound(stream, conn, side)
        else:
            await self._outbound(stream, conn, side)

    async def _inbound(self, stream: trio.SocketStream, conn: Conn, side: TlsSide) -> None:
        conn.tls = TLSStream(stream, side)
        if not await self.handshake(conn):
            return
        target = await connect_tcp(self.config.target, self.config.connect_timeout)
        if isinstance(target, tuple):
            self.record(
                conn,
                "connection.close",
                "allow",
                target[0],
                outcome="upstream_error",
                error=target[1],
                bytes_up=0,
                bytes_down=0,
                duration_ms=ms_since(conn.started),
            )
            return
        self.record(conn, "connection.open", "allow", "peer_allowed")
        try:
            await self._relay(conn, conn.tls, target)
        finally:
            # As ``async with target`` without aclose's checkpoint: the
            # handler is ending, and nothing in a close waits.
            target.socket.close()

    async def _outbound(self, stream: trio.SocketStream, conn: Conn, side: TlsSide) -> None:
        # For outbound the TLS peer is the upstream; the agent is the client.
        conn.client_addr, conn.peer_addr = conn.peer_addr, str(self.config.target)
        target = await connect_tcp(self.config.target, self.config.connect_timeout)
        if isinstance(target, tuple):
            self.record(
                conn,
                "connection.refused",
                "deny",
                target[0],
                outcome="upstream_error",
                error=target[1],
            )
            return
        with contextlib.suppress(OSError):
            conn.peer_addr = format_sockaddr(target.socket.getpeername())
        conn.tls = TLSStream(target, side)
        if not await self.handshake(conn):
            return
        self.record(conn, "connection.open", "allow", "peer_allowed")
        await self._relay(conn, stream, conn.tls)

    async def serve(
        self,
        handlers: trio.Nursery,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if USE_REACTOR and self.reactor is None:
            # Not handed the process's reactor (run in-process on its own):
            # run one in the handler nursery, so it outlives every relay.
            await handlers.start(self._own_reactor)
        await super().serve(handlers, task_status)

    async def _own_reactor(self, task_status: trio.TaskStatus[None]) -> None:
        async with open_reactor() as reactor:
            self.reactor = reactor
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.reactor = None

    async def _relay(
        self,
        conn: Conn,
        accepted: trio.SocketStream | TLSStream,
        far: trio.SocketStream | TLSStream,
    ) -> None:
        # The close record is written even when shutdown cancels the relay.
        ended = _Ended("closed", None, None, 0, 0)
        try:
            reactor = self.reactor if USE_REACTOR else None
            if reactor is None:
                await self._trio_relay(conn, accepted, far, ended)
            else:
                await self._reactor_relay(reactor, conn, accepted, far, ended)
        finally:
            self.record(
                conn,
                "connection.close",
                "allow",
                ended.reason,
                outcome=_outcome(ended.reason, ended.stalled),
                error=ended.error,
                bytes_up=ended.bytes_up,
                bytes_down=ended.bytes_down,
                duration_ms=ms_since(conn.started),
            )

    async def _reactor_relay(
        self,
        reactor: Reactor,
        conn: Conn,
        accepted: trio.SocketStream | TLSStream,
        far: trio.SocketStream | TLSStream,
        ended: _Ended,
    ) -> None:
        result = RelayResult()
        try:
            await reactor.relay(
                accepted, far, write_timeout=self.config.write_timeout, result=result
            )
        finally:
            reason, error = result.reason, result.detail
            if reason == "cancelled":
                reason, error = conn.end_reason(), None
            elif reason == "write_timeout":
                error = f"the {result.stalled} read nothing for {self.config.write_timeout:g}s"
            elif (
                reason == "target_reset"
                and self.direction == "outbound"
                and result.bytes_down == 0
                and "alert" in (error or "").lower()
            ):
                # Nothing came back yet: the upstream's alert judged us.
                reason, error = "refused_by_upstream", f"upstream refused us: {error}"
            for stream, name in ((accepted, "client"), (far, "target")):
                if isinstance(stream, TLSStream):
                    # The reactor drove OpenSSL: the stream's close must know.
                    stream.released(
                        broken=result.reason == f"{name}_reset",
                        truncated=name in result.truncated,
                    )
            ended.reason, ended.error, ended.stalled = reason, error, result.stalled
            ended.bytes_up, ended.bytes_down = result.bytes_up, result.bytes_down

    async def _trio_relay(
        self, conn: Conn, accepted: trio.abc.Stream, far: trio.abc.Stream, ended: _Ended
    ) -> None:
        stats = RelayStats()
        finished = False
        try:
            await relay(accepted, far, stats, write_timeout=self.config.write_timeout)
            finished = True
        finally:
            reason = stats.error or ("closed" if finished else conn.end_reason())
            error = stats.detail
            if reason == "target_reset" and self.direction == "outbound":
                alert = peer_alert(stats.cause)
                if alert is not None and stats.bytes_down == 0:
                    # Nothing came back yet: the upstream's alert judged us.
                    reason, error = "refused_by_upstream", f"upstream refused us: {alert}"
            ended.reason, ended.error, ended.stalled = reason, error, stats.stalled
            ended.bytes_up, ended.bytes_down = stats.bytes_up, stats.bytes_down
