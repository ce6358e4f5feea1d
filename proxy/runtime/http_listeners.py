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
from urllib.parse import urlsplit

import h11
import structlog
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.agent.a2a import TaskOwnership
from proxy.audit import AuditSink, rfc3339
from proxy.config import InboundConfig, OutboundConfig, RouteConfig
from proxy.guard.approval import APPROVAL_HEADER
from proxy.guard.policy import GuardDecision, PolicySet, RequestFacts
from proxy.guard.quarantine import GuardConfig
from proxy.http.a2a_flow import A2aGuard
from proxy.http.conn import Downstream, Limits, PeerError, Upstream
from proxy.http.headers import XFCC, Header, header_map, header_value, xfcc_value
from proxy.http.mcp_flow import McpGuard
from proxy.http.policy import BadPath, RequestDecision, normalize_path
from proxy.http.pool import UpstreamPool
from proxy.http.session import HttpSession, RequestOutcome, Routed, UpstreamFailure
from proxy.identity import IdentitySnapshot, IdentityState, SideCache, SpiffeId, TrustBundleSet
from proxy.policy import SpiffePattern, decide_peer
from proxy.runtime.gate import Gate, svid_age_seconds
from proxy.runtime.l4 import connect_tcp
from proxy.runtime.listener import BaseListener, Conn, handshake_within, ms_since
from proxy.tls import TlsSide, TLSStream, build_side

log = structlog.get_logger("agent_proxy")


def _limits(config: InboundConfig | OutboundConfig) -> Limits:
    lim = config.limits
    return Limits(
        max_header_bytes=lim.max_header_bytes,
        max_headers=lim.max_headers,
        idle_timeout=lim.idle_timeout,
        request_timeout=lim.request_timeout,
        response_timeout=lim.response_timeout,
    )


def _origin_form(request: h11.Request) -> tuple[bytes, str | None]:
    """(origin-form target, host from an absolute-form target if any)."""
    target = request.target
    if target.startswith(b"/"):
        return target, None
    text = target.decode("ascii", "replace")
    parts = urlsplit(text)
    if parts.scheme.lower() != "http" or not parts.netloc:
        raise PeerError(400, "bad_request", "request target must be origin-form or http://")
    origin = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return origin.encode("ascii"), parts.netloc.lower()


def _normalized(origin: bytes) -> str:
    try:
        return normalize_path(origin.decode("ascii"))
    except (BadPath, UnicodeDecodeError) as exc:
        raise PeerError(400, "bad_path", f"refused request path: {exc}") from exc


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _gated(
    gate: Gate,
    policy: PolicySet,
    request: h11.Request,
    path: str,
    upgrade: bool,
    *,
    peer: SpiffeId | None,
    svid_age: float | None,
    bundles: TrustBundleSet,
    max_body: int,
    base: Routed,
) -> Routed:
    """Decide with the guard; a high-impact rule makes the session hand us
    the body's hash first (``Routed.finish``)."""
    method = request.method.decode("ascii")
    facts = RequestFacts(
        peer=peer,
        method=method,
        path=path,
        now=_dt.datetime.now(_dt.UTC),
        svid_age_seconds=svid_age,
        headers=header_map(request.headers) if policy.reads_headers else {},
        upgrade=upgrade,
    )
    token_raw = header_value(request.headers, APPROVAL_HEADER.lower().encode())
    token = token_raw.decode("ascii", "replace") if token_raw else None

    def decide(body_hash: str | None, decision: GuardDecision | None = None) -> Routed:
        result = gate.check(
            policy,
            facts,
            bundles=bundles,
            approval_token=token,
            target=path,
            body_hash=body_hash,
            decision=decision,
        )
        base.decision = RequestDecision(result.allowed, result.reason, result.rule)
        base.status = result.status
        base.allow_upgrade = result.allowed and upgrade
        base.reply_headers = [(n.encode(), v.encode()) for n, v in result.headers]
        base.audit = result.audit_fields()
        base.finish = None
        return base

    preview = policy.evaluate(facts)
    needs_body = preview.allowed and any(step.approvers for _, step in preview.high_impact)
    if needs_body:
        base.decision = RequestDecision(True, preview.reason, preview.rule)
        base.max_body = max_body
        base.finish = decide
        return base
    return decide(_EMPTY_SHA256, preview)


def emit_outcome(
    listener: BaseListener, conn: Conn, outcome: RequestOutcome, **overrides: object
) -> None:
    """One ``mcp.call`` record per JSON-RPC call, then the ``http.request``."""
    for call in outcome.calls:
        fields = dict(call)
        decision, reason = str(fields.pop("decision")), str(fields.pop("reason"))
        listener.record(
            conn,
            "mcp.call",
            decision,
            reason,
            request_id=outcome.request_id,
            path=outcome.path,
            **fields,
        )
    listener.record(
        conn,
        "http.request",
        outcome.decision,
        outcome.reason,
        rule=outcome.rule,
        request_id=outcome.request_id,
        method=outcome.method,
        path=outcome.path,
        status=outcome.status,
        bytes_up=outcome.bytes_up,
        bytes_down=outcome.bytes_down,
        duration_ms=outcome.duration_ms,
        error=outcome.error,
        **overrides,
        **outcome.extra,
    )


class _InboundRouter:
    def __init__(
        self,
        listener: HttpInboundListener,
        peer: SpiffeId,
        svid_age: float,
        bundles: TrustBundleSet,
        key: Hashable,
        xfcc: Header,
    ) -> None:
        self.listener = listener
        self.peer = peer
        self.svid_age = svid_age
        self.bundles = bundles
        self.key = key
        self.xfcc = xfcc

    def route(self, request: h11.Request, upgrade: bool) -> Routed:
        if request.method == b"CONNECT":
            return Routed(RequestDecision(False, "connect_not_allowed", None))
        origin, _ = _origin_form(request)
        path = _normalized(origin)
        listener = self.listener
        base = Routed(
            RequestDecision(False, "no_matching_rule", None),
            path=path,
            key=self.key,
            target=origin,
            add_headers=(self.xfcc,),
            strip=listener.strip,
        )
        protocol = listener.config.protocol
        if protocol in ("mcp", "a2a"):
            max_body = listener.config.max_body_bytes
            if protocol == "mcp":
                base.mcp = McpGuard(
                    lambda: listener.policy,
                    listener.gate,
                    self.peer,
                    self.svid_age,
                    self.bundles,
                    max_body,
                )
            else:
                base.mcp = A2aGuard(
                    lambda: listener.policy,
                    listener.gate,
                    self.peer,
                    self.svid_age,
                    self.bundles,
                    max_body,
                    listener.tasks,
                )
            if request.method == b"POST":
                return base  # decided per JSON-RPC call
        # The policy is read per request, so a hot reload applies at once.
        return _gated(
            listener.gate,
            listener.policy,
            request,
            path,
            upgrade,
            peer=self.peer,
            svid_age=self.svid_age,
            bundles=self.bundles,
            max_body=listener.config.max_body_bytes,
            base=base,
        )


class HttpInboundListener(BaseListener):
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
        self.limits = _limits(config)
        self.strip = frozenset(h.lower().encode() for h in config.identity_headers) | {XFCC}
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
        router = _InboundRouter(
            self, verified.spiffe_id, age, conn.snapshot.bundles, "target", xfcc
        )
        self.record(conn, "connection.open", "allow", "peer_allowed")
        session = HttpSession(
            Downstream(conn.tls, self.limits),
            router,
            self.pool,
            self.limits,
            partial(self._emit, conn),
        )
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


class _OutboundRouter:
    def __init__(self, config: OutboundConfig, gate: Gate, identity: IdentityState) -> None:
        self.gate = gate
        self.identity = identity
        self.tasks = TaskOwnership()
        self.proxy_mode = config.protocol == "http-proxy"
        self.routes = {r.host: r for r in config.routes if r.host is not None}
        self.single = config.routes[0] if not self.proxy_mode else None

    def _lookup(self, host: str | None) -> RouteConfig | None:
        if self.single is not None:
            return self.single
        if not host:
            return None
        host = host.lower()
        found = self.routes.get(host)
        if found is None and host.endswith(":80"):
            found = self.routes.get(host[:-3])
        if found is None and ":" in host and not host.startswith("["):
            bare = host.rsplit(":", 1)[0]
            candidate = self.routes.get(bare)
            # A route without a port matches the host on the default port only.
            found = candidate if candidate is not None and host.endswith(":80") else None
        return found

    def route(self, request: h11.Request, upgrade: bool) -> Routed:
        if request.method == b"CONNECT":
            return Routed(RequestDecision(False, "connect_not_allowed", None))
        origin, host = _origin_form(request)
        if host is None:
            raw_host = header_value(request.headers, b"host")
            host = raw_host.decode("ascii", "replace").lower() if raw_host else None
        route = self._lookup(host)
        path = _normalized(origin)
        if route is None or route.policy is None:
            return Routed(RequestDecision(False, "egress_not_allowed", None), path=path, label=host)
        base = Routed(
            RequestDecision(False, "no_matching_rule", None),
            path=path,
            key=route.name,
            target=origin,
            strip=frozenset({XFCC}),
            label=str(route.target),
        )
        snapshot = self.identity.current
        if route.protocol in ("mcp", "a2a"):
            policy = route.policy
            if route.protocol == "mcp":
                base.mcp = McpGuard(
                    lambda: policy, self.gate, None, None, snapshot.bundles, route.max_body_bytes
                )
            else:
                base.mcp = A2aGuard(
                    lambda: policy,
                    self.gate,
                    None,
                    None,
                    snapshot.bundles,
                    route.max_body_bytes,
                    self.tasks,
                )
            if request.method == b"POST":
                return base  # decided per JSON-RPC call
        return _gated(
            self.gate,
            route.policy,
            request,
            path,
            upgrade,
            peer=None,
            svid_age=None,
            bundles=snapshot.bundles,
            max_body=route.max_body_bytes,
            base=base,
        )


class HttpOutboundListener(BaseListener):
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
        self.limits = _limits(config)
        self.routes = {r.name: r for r in config.routes}
        self.gate = gate or Gate(GuardConfig())
        self.router = _OutboundRouter(config, self.gate, identity)
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
            raise UpstreamFailure(
                502, failure[0], failure[1], str(verified.spiffe_id) if verified else None
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
        )
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
