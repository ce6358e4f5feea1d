"""HTTP-mode listeners.

Inbound: terminate mTLS, then judge every request (peer, method, path)
against the listener's rules; allowed requests go to the local target with
``X-Forwarded-Client-Cert`` set by us after any client copy was removed.
Only peers that some rule names get through the TLS handshake at all.

Outbound: the agent speaks plain HTTP on loopback, either to a fixed route
(``http``) or as to a forward proxy (``http-proxy``: absolute-form requests
routed by host; CONNECT refused so nothing tunnels around us). Upstream
connections are mTLS, verified against the route's expected SPIFFE IDs, and
pooled per route.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Hashable
from functools import partial

import structlog
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.agent.a2a import TaskOwnership
from proxy.audit import AuditSink, rfc3339
from proxy.config import InboundConfig, OutboundConfig, RouteConfig
from proxy.http.conn import Downstream, Upstream
from proxy.http.exchange import RequestOutcome
from proxy.http.headers import XFCC, fold, xfcc_value
from proxy.http.pool import UpstreamPool
from proxy.http.routing import UpstreamFailure
from proxy.http.session import HttpSession
from proxy.identity import IdentitySnapshot, IdentityState, SideCache
from proxy.policy import SpiffePattern, decide_peer
from proxy.policy.evaluate import PolicySet
from proxy.policy.gate import Gate, svid_age_seconds
from proxy.policy.quarantine import GuardConfig
from proxy.runtime.http_routers import InboundRouter, OutboundRouter, emit_outcome, limits_of
from proxy.runtime.l4 import connect_tcp
from proxy.runtime.listener import BaseListener, Conn, handshake_within, ms_since
from proxy.runtime.relay import RelayStats, relay
from proxy.tls import TlsSide, TLSStream, build_side

log = structlog.get_logger("agent_proxy")


async def raw_relay(
    down: trio.abc.Stream, up: trio.abc.Stream, *, write_timeout: float
) -> tuple[int, int]:
    """The byte relay after a 101 (half-close, resets and the write timeout
    as for TCP listeners): (bytes up, bytes down)."""
    stats = RelayStats()
    await relay(down, up, stats, write_timeout=write_timeout)
    return stats.bytes_up, stats.bytes_down


class HttpInboundListener(BaseListener):
    refuses_when_audit_fails = False  # answers 503 audit_unavailable instead

    def __init__(
        self,
        config: InboundConfig,
        identity: IdentityState,
        audit: AuditSink,
        gate: Gate | None = None,
    ) -> None:
        super().__init__(
            name=config.name,
            direction="inbound",
            listen=config.listen,
            target_label=str(config.target),
            max_connections=config.max_connections,
            handshake_timeout=config.handshake_timeout,
            identity=identity,
            audit=audit,
            max_lifetime=config.limits.max_connection_lifetime,
            graceful_lifetime=True,
        )
        self.config = config
        self.limits = limits_of(config)
        self.strip = frozenset(fold(h.encode()) for h in config.identity_headers) | {XFCC}
        self.gate = gate or Gate(GuardConfig())
        self.tasks = TaskOwnership()  # A2A: who created which task
        self.set_policy(config.guard)

        def build(snapshot: IdentitySnapshot) -> TlsSide:
            # Peers no rule names are refused inside the handshake (TLS alert);
            # read per handshake so a policy reload applies to new connections.
            return build_side(
                snapshot.svid,
                snapshot.bundles,
                lambda peer: decide_peer(peer, self.admitted),
                server=True,
                min_version=config.min_tls,
            )

        self._sides = SideCache(identity, build, name=f"listener {config.name}")
        self.pool = UpstreamPool(
            self._connect,
            max_idle_per_key=64,
            idle_timeout=30.0,
            max_per_key=config.max_connections,
        )

    def set_policy(self, policy: PolicySet) -> None:
        """Swap the rules (hot reload): new requests and handshakes use them."""
        self.policy = policy
        self.admitted: tuple[SpiffePattern, ...] = policy.admitted_peers()

    async def background(self) -> None:
        await self.pool.sweep_forever()

    async def _connect(self, key: Hashable) -> Upstream:
        stream = await connect_tcp(self.config.target, self.config.connect_timeout)
        if isinstance(stream, tuple):
            raise UpstreamFailure(502, stream[0], stream[1])
        return Upstream(stream, key, self.limits)

    async def handle(self, stream: trio.SocketStream, conn: Conn) -> None:
        conn.snapshot, side = self._sides.current()
        conn.tls = TLSStream(stream, side)
        if not await self.handshake(conn):
            return
        verified = conn.tls.peer.verified
        assert verified is not None
        leaf_hash = hashlib.sha256(verified.leaf.public_bytes(Encoding.DER)).hexdigest()
        xfcc = (XFCC, xfcc_value(conn.snapshot.local_id, leaf_hash, str(verified.spiffe_id)))
        age = svid_age_seconds(verified.leaf.not_valid_before_utc, _dt.datetime.now(_dt.UTC))
        router = InboundRouter(self, verified.spiffe_id, age, conn.snapshot.bundles, "target", xfcc)
        self.record(conn, "connection.open", "allow", "peer_allowed")
        session = HttpSession(
            Downstream(conn.tls, self.limits),
            router,
            self.pool,
            self.limits,
            partial(self._emit, conn),
            raw_relay=partial(raw_relay, write_timeout=self.config.write_timeout),
        )
        session.accepting = self.audit.accepting
        session.lifetime_deadline = conn.lifetime_deadline
        finished = False
        try:
            await session.run()
            finished = True
        finally:
            self.record(
                conn,
                "connection.close",
                "allow",
                (session.end_reason or "closed") if finished else conn.end_reason(),
                requests=session.requests,
                duration_ms=ms_since(conn.started),
            )

    def _emit(self, conn: Conn, outcome: RequestOutcome) -> None:
        emit_outcome(self, conn, outcome)


class HttpOutboundListener(BaseListener):
    refuses_when_audit_fails = False  # answers 503 audit_unavailable instead

    def __init__(
        self,
        config: OutboundConfig,
        identity: IdentityState,
        audit: AuditSink,
        gate: Gate | None = None,
    ) -> None:
        label = ", ".join(f"{r.host or r.name}={r.target}" for r in config.routes)
        super().__init__(
            name=config.name,
            direction="outbound",
            listen=config.listen,
            target_label=label,
            max_connections=config.max_connections,
            handshake_timeout=config.handshake_timeout,
            identity=identity,
            audit=audit,
        )
        self.config = config
        self.limits = limits_of(config)
        self.routes = {r.name: r for r in config.routes}
        self.gate = gate or Gate(GuardConfig())
        self.router = OutboundRouter(config, self.gate, identity)
        self._sides = {
            r.name: SideCache(identity, self._side_builder(r), name=f"route {r.name}")
            for r in config.routes
        }
        pool = config.pool
        self.pool = UpstreamPool(
            self._connect,
            max_idle_per_key=pool.max_idle_per_route,
            idle_timeout=pool.idle_timeout,
            max_per_key=pool.max_per_route,
        )

    def set_routes(self, routes: tuple[RouteConfig, ...]) -> None:
        """Swap the routes' rules (hot reload; addresses and hosts are unchanged)."""
        self.routes = {r.name: r for r in routes}
        self.router.routes = {r.host: r for r in routes if r.host is not None}
        if self.router.single is not None:
            self.router.single = routes[0]

    def _side_builder(self, route: RouteConfig):  # type: ignore[no-untyped-def]
        expect = route.expect

        def build(snapshot: IdentitySnapshot) -> TlsSide:
            return build_side(
                snapshot.svid,
                snapshot.bundles,
                lambda peer: decide_peer(peer, expect),
                server=False,
                min_version=self.config.min_tls,
            )

        return build

    async def background(self) -> None:
        await self.pool.sweep_forever()

    async def _connect(self, key: Hashable) -> Upstream:
        route = self.routes[str(key)]
        _, side = self._sides[route.name].current()
        stream = await connect_tcp(route.target, self.config.connect_timeout)
        if isinstance(stream, tuple):
            raise UpstreamFailure(502, stream[0], stream[1])
        tls = TLSStream(stream, side)
        failure = await handshake_within(tls, self.handshake_timeout)
        verified = tls.peer.verified
        if failure is not None:
            await tls.aclose()
            reason, detail = failure
            if reason == "tls_error" and "alert" in detail.lower() and verified is not None:
                # We accepted the upstream and it sent an alert: it refused us
                # (TLS 1.2; under 1.3 the refusal arrives on the first read).
                reason, detail = "upstream_refused", f"the upstream refused our identity: {detail}"
            raise UpstreamFailure(
                502, reason, detail, str(verified.spiffe_id) if verified else None
            )
        assert verified is not None
        up = Upstream(tls, key, self.limits)
        # Continuous authentication for pooled connections: never reuse one
        # past its upstream's certificate or max_connection_lifetime.
        not_after = min(cert.not_valid_after_utc for cert in verified.chain)
        up.expires_at = trio.current_time() + max(
            0.0, (not_after - _dt.datetime.now(_dt.UTC)).total_seconds()
        )
        lifetime = self.config.limits.max_connection_lifetime
        if lifetime is not None:
            up.expires_at = min(up.expires_at, trio.current_time() + lifetime)
        up.peer_id = str(verified.spiffe_id)
        up.peer_serial = verified.serial_hex
        up.peer_not_after = rfc3339(verified.not_after)
        return up

    async def handle(self, stream: trio.SocketStream, conn: Conn) -> None:
        conn.client_addr, conn.peer_addr = conn.peer_addr, None
        session = HttpSession(
            Downstream(stream, self.limits),
            self.router,
            self.pool,
            self.limits,
            partial(self._emit, conn),
            raw_relay=partial(raw_relay, write_timeout=self.config.write_timeout),
        )
        session.accepting = self.audit.accepting
        await session.run()

    def _emit(self, conn: Conn, outcome: RequestOutcome) -> None:
        # For outbound the peer is the upstream this request went to.
        emit_outcome(
            self,
            conn,
            outcome,
            peer_id=outcome.upstream_peer,
            peer_cert_serial=outcome.upstream_serial,
            peer_cert_not_after=outcome.upstream_not_after,
            target=outcome.target or self.target_label,
        )
