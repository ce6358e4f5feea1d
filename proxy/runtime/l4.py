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
from dataclasses import dataclass

import trio
from OpenSSL import SSL

from proxy.audit import AuditSink, Direction
from proxy.identity import IdentitySnapshot, IdentityState, SideCache
from proxy.netaddr import HostPort, format_sockaddr
from proxy.policy import SpiffePattern, decide_peer
from proxy.policy.evaluate import PolicySet
from proxy.runtime.listener import BaseListener, Conn, ms_since
from proxy.runtime.relay import RelayStats, relay
from proxy.tls import TlsSide, TLSStream, TlsVersion, build_side


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
    with trio.move_on_after(timeout):
        try:
            return await trio.open_tcp_stream(target.host, target.port)
        except OSError as exc:
            return "target_unreachable", str(exc.strerror or exc)
    return "target_connect_timeout", f"no connection within {timeout:g}s"


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


def _outcome(reason: str, stats: RelayStats) -> str:
    if reason == "write_timeout":
        return "client_error" if stats.stalled == "client" else "upstream_error"
    return _OUTCOMES.get(reason, "served")


def upstream_alert(exc: BaseException | None) -> str | None:
    """The TLS alert a peer sent us, if ``exc`` (or what caused it) is one."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, SSL.Error) and "alert" in str(exc).lower():
            return str(exc)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


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
        async with target:
            await self._relay(conn, conn.tls, target)

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

    async def _relay(self, conn: Conn, accepted: trio.abc.Stream, far: trio.abc.Stream) -> None:
        # The close record is written even when shutdown cancels the relay.
        stats = RelayStats()
        finished = False
        try:
            await relay(accepted, far, stats, write_timeout=self.config.write_timeout)
            finished = True
        finally:
            reason = stats.error or ("closed" if finished else conn.end_reason())
            error = stats.detail
            if reason == "target_reset" and self.direction == "outbound":
                alert = upstream_alert(stats.cause)
                if alert is not None and stats.bytes_down == 0:
                    # Nothing came back yet: the upstream's alert judged us.
                    reason, error = "refused_by_upstream", f"upstream refused us: {alert}"
            self.record(
                conn,
                "connection.close",
                "allow",
                reason,
                outcome=_outcome(reason, stats),
                error=error,
                bytes_up=stats.bytes_up,
                bytes_down=stats.bytes_down,
                duration_ms=ms_since(conn.started),
            )
