"""HTTP-mode listeners.

Inbound: terminate mTLS, then judge every request (peer, method, path)
against the listener's rules; allowed requests go to the local target with
``X-Forwarded-Client-Cert`` set by us after any client copy was removed.
Only peers that some rule names get through the TLS handshake at all.

With ``jwt_svid``, callers reach us through an L7 hop that terminated
their mTLS: the hop's SVID gets through the handshake (its chain checked
against its trust domain's bundle), and every request must carry a valid
JWT-SVID for our audience, whose subject is the peer the rules judge.

Outbound: the agent speaks plain HTTP on loopback, either to a fixed route
(``http``) or as to a forward proxy (``http-proxy``: absolute-form requests
routed by host; CONNECT refused so nothing tunnels around us). Upstream
connections are mTLS, verified against the route's expected SPIFFE IDs, or
(``upstream_tls = "dns"``) WebPKI TLS verified against the route's DNS name,
and pooled per route. A route's credential is minted in the background by
its provider and set on each allowed request (proxy.credentials.egress).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable, Hashable
from functools import cached_property, partial
from typing import TYPE_CHECKING, cast

import structlog
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.audit import AuditSink, rfc3339
from proxy.config import IdentityConfig, InboundConfig, OutboundConfig, RouteConfig
from proxy.credentials.config import CredentialConfig
from proxy.http.conn import Downstream
from proxy.http.exchange import RequestOutcome
from proxy.http.headers import XFCC, fold, xfcc_value
from proxy.http.pool import UpstreamPool
from proxy.http.routing import UpstreamFailure
from proxy.http.session import HttpSession
from proxy.http.upstream import Upstream
from proxy.identity import IdentitySnapshot, IdentityState, SideCache, SpiffeId
from proxy.netaddr import format_sockaddr
from proxy.policy import PeerDecision, SpiffePattern, decide_peer
from proxy.policy.evaluate import PolicySet
from proxy.policy.gate import Gate, svid_age_seconds
from proxy.policy.quarantine import GuardConfig
from proxy.runtime.direct import direct_body
from proxy.runtime.http_routers import (
    InboundRouter,
    OutboundRouter,
    decision_durable,
    emit_outcome,
    limits_of,
)
from proxy.runtime.l4 import connect_tcp
from proxy.runtime.listener import BaseListener, Conn, handshake_within, ms_since
from proxy.runtime.relay import RelayStats, relay
from proxy.tls import TlsSide, TLSStream, build_side
from proxy.tls.dns import DnsSide, verified_upstream

if TYPE_CHECKING:
    # Imported where a config uses them: the fetchers and JWT bundle
    # sources pull in gRPC and PyJWT, which a plain sidecar never loads.
    from proxy.agent.a2a import TaskOwnership
    from proxy.credentials.build import JwtSvidSource
    from proxy.credentials.provider import CredentialProvider
    from proxy.credentials.sources import InboundJwtBundles
    from proxy.identity.jwt_svid import JwtBundleSet

log = structlog.get_logger("agent_proxy")

# Listeners built without the identity config (tests) have no JWT source.
_NO_IDENTITY = IdentityConfig(source="files")


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
        identity_config: IdentityConfig | None = None,
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
        self.set_policy(config.guard)
        self._jwt: InboundJwtBundles | None = None
        if config.jwt_svid is not None:
            from proxy.credentials.sources import inbound_jwt_bundles

            self._jwt = inbound_jwt_bundles(config.jwt_svid, identity_config or _NO_IDENTITY)
            # The caller's proof is never the backend's to replay.
            self.strip |= {b"authorization"}

        def admit(peer: SpiffeId) -> PeerDecision:
            if self._jwt is not None:
                # The L7 hop's SVID passed the chain check of its own trust
                # domain; the rules judge the JWT-SVID of each request.
                return PeerDecision(True, "peer_allowed", "jwt_svid")
            return decide_peer(peer, self.admitted)

        def build(snapshot: IdentitySnapshot) -> TlsSide:
            # Peers no rule names are refused inside the handshake (TLS alert);
            # read per handshake so a policy reload applies to new connections.
            return build_side(
                snapshot.svid,
                snapshot.bundles,
                admit,
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

    @cached_property
    def tasks(self) -> TaskOwnership:
        """A2A: who created which task. Made on first use, not with the
        listener: only an A2A listener loads the A2A code (start-up time)."""
        from proxy.agent.a2a import TaskOwnership

        return TaskOwnership()

    def jwt_bundles(self) -> JwtBundleSet:
        if self._jwt is not None:
            return self._jwt.current()
        from proxy.identity.jwt_svid import JwtBundleSet  # only with jwt_svid configured

        return JwtBundleSet()

    async def background(self) -> None:
        async with trio.open_nursery() as nursery:
            if self._jwt is not None and self._jwt.run is not None:
                nursery.start_soon(self._jwt.run)
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
        session.direct = partial(direct_body, self._reactor)
        session.accepting = self.audit.accepting
        session.trace(self.tracer, True, conn.snapshot.local_id, str(verified.spiffe_id))
        session.decision_durable = partial(decision_durable, self, conn)
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
        identity_config: IdentityConfig | None = None,
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
        self.providers = _providers(config.routes, identity, identity_config or _NO_IDENTITY)
        self.router = OutboundRouter(config, self.gate, identity, self.providers)
        # DNS routes' sides are rebuilt with each identity snapshot too:
        # client_cert = "svid" presents the current SVID.
        self._sides: dict[str, SideCache[TlsSide] | SideCache[DnsSide]] = {
            r.name: SideCache(identity, self._side_builder(r), name=f"route {r.name}")
            for r in config.routes
            if r.upstream_tls.mode == "spiffe"
        }
        for r in config.routes:
            if r.upstream_tls.mode == "dns":
                self._sides[r.name] = SideCache(identity, _dns_builder(r), name=f"route {r.name}")
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
        async with trio.open_nursery() as nursery:
            for provider in self.providers.values():
                nursery.start_soon(provider.run)
            await self.pool.sweep_forever()

    async def _connect(self, key: Hashable) -> Upstream:
        route = self.routes[str(key)]
        _, side = self._sides[route.name].current()
        stream = await connect_tcp(route.target, self.config.connect_timeout)
        if isinstance(stream, tuple):
            raise UpstreamFailure(502, stream[0], stream[1])
        peer_addr = format_sockaddr(stream.socket.getpeername())
        if isinstance(side, DnsSide):
            up = await self._connect_dns(stream, side, key)
            up.peer_addr = peer_addr
            return up
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
        up.peer_addr = peer_addr
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

    async def _connect_dns(
        self, stream: trio.SocketStream, side: DnsSide, key: Hashable
    ) -> Upstream:
        # TLSStream reads only new_connection() and the verification's
        # reason and message, which DnsSide and DnsVerification both have.
        tls = TLSStream(stream, cast(TlsSide, side))
        failure = await handshake_within(tls, self.handshake_timeout)
        verified = verified_upstream(tls)
        if failure is not None:
            await tls.aclose()
            reason, detail = failure
            if reason == "tls_error" and "alert" in detail.lower() and verified is not None:
                reason, detail = "upstream_refused", f"the upstream refused us: {detail}"
            raise UpstreamFailure(502, reason, detail)
        assert verified is not None
        up = Upstream(tls, key, self.limits)
        # As for SPIFFE upstreams: never reuse a pooled connection past the
        # upstream's chain or max_connection_lifetime.
        left = (verified.chain_not_after - _dt.datetime.now(_dt.UTC)).total_seconds()
        up.expires_at = trio.current_time() + max(0.0, left)
        lifetime = self.config.limits.max_connection_lifetime
        if lifetime is not None:
            up.expires_at = min(up.expires_at, trio.current_time() + lifetime)
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
        session.direct = partial(direct_body, self._reactor)
        session.accepting = self.audit.accepting
        session.trace(self.tracer, False, conn.snapshot.local_id)
        session.decision_durable = partial(decision_durable, self, conn)
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
            peer_addr=outcome.upstream_addr,
            target=outcome.target or self.target_label,
        )


def _dns_builder(route: RouteConfig) -> Callable[[IdentitySnapshot], DnsSide]:
    from proxy.credentials.build import dns_side_builder

    build = dns_side_builder(route.name, route.upstream_tls)
    return lambda snapshot: build(snapshot.svid)


def _providers(
    routes: tuple[RouteConfig, ...], identity: IdentityState, identity_config: IdentityConfig
) -> dict[str, CredentialProvider]:
    """One provider per route with a credential; each reads the current SVID
    per fetch, so rotation needs nothing more."""
    out: dict[str, CredentialProvider] = {}
    source: JwtSvidSource | None = None
    for route in routes:
        cfg = route.credential
        if cfg is None:
            continue
        from proxy.credentials.build import build_provider
        from proxy.credentials.sources import jwt_svid_source

        if source is None and _needs_jwt_svid(cfg):
            source = jwt_svid_source(identity_config)
        out[route.name] = build_provider(
            route.name, cfg, identity=lambda: identity.current.svid, jwt_source=source
        )
    return out


def _needs_jwt_svid(cfg: CredentialConfig) -> bool:
    return cfg.type == "jwt-svid" or (
        cfg.type == "oauth2-jwt-bearer" and cfg.assertion == "jwt-svid"
    )
