"""Routing and judging HTTP requests for the HTTP listeners (no I/O).

An inbound router belongs to one connection (it knows the verified peer);
the outbound router maps the agent's request to a route by host. Both
normalise the target (what policy judges is what the backend gets), then
let the gate decide, or hand the agent-protocol hook the body when the
protocol decides per call.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
from collections.abc import Hashable
from functools import cached_property
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import structlog

from proxy.config import InboundConfig, OutboundConfig, RouteConfig
from proxy.http.conn import Limits
from proxy.http.exchange import PeerError, RequestOutcome
from proxy.http.headers import XFCC, Header, header_map, header_value
from proxy.http.routing import Routed
from proxy.http.wire import Request
from proxy.identity import IdentityState, SpiffeId, TrustBundleSet
from proxy.policy.approval import APPROVAL_HEADER
from proxy.policy.evaluate import PolicySet
from proxy.policy.gate import Gate
from proxy.policy.paths import BadPath, normalize_path
from proxy.policy.rules import RequestFacts
from proxy.policy.verdict import RequestVerdict, refused
from proxy.runtime.listener import BaseListener, Conn

if TYPE_CHECKING:
    from proxy.agent.a2a import TaskOwnership
    from proxy.credentials.provider import CredentialProvider
    from proxy.http.a2a_flow import A2aGuard
    from proxy.http.mcp_flow import McpGuard
    from proxy.identity.jwt_svid import JwtBundleSet, JwtSvidError


class InboundView(Protocol):
    """What an inbound router reads from its listener, per request (a hot
    reload swaps ``policy`` and applies at once)."""

    policy: PolicySet
    gate: Gate
    strip: frozenset[bytes]

    @property
    def config(self) -> InboundConfig: ...

    @property
    def tasks(self) -> TaskOwnership: ...

    def jwt_bundles(self) -> JwtBundleSet:
        """The JWT bundles inbound ``jwt_svid`` validates with, now."""
        ...


log = structlog.get_logger("agent_proxy")


def limits_of(config: InboundConfig | OutboundConfig) -> Limits:
    lim = config.limits
    return Limits(
        max_header_bytes=lim.max_header_bytes,
        max_headers=lim.max_headers,
        idle_timeout=lim.idle_timeout,
        request_timeout=lim.request_timeout,
        response_timeout=lim.response_timeout,
        write_timeout=config.write_timeout,
    )


async def decision_durable(listener: BaseListener, conn: Conn, outcome: RequestOutcome) -> bool:
    """A high-impact request's ``http.decision`` record, made durable before
    the request is forwarded (fsynced with ``durability = "fsync"``). False:
    the trail cannot take it, so the request must not go on."""
    listener.record(
        conn,
        "http.decision",
        outcome.decision,
        outcome.reason,
        rule=outcome.rule,
        request_id=outcome.request_id,
        method=outcome.method,
        path=outcome.path,
        target=outcome.target or listener.target_label,
        **outcome.extra,
    )
    return await listener.audit.durable()


def _origin_form(request: Request) -> tuple[bytes, str | None]:
    """(origin-form target, host from an absolute-form target if any)."""
    target = request.target
    if b"#" in target:
        raise PeerError(400, "bad_path", "refused request path: fragment in request target")
    if target.startswith(b"/"):
        return target, None
    text = target.decode("ascii", "replace")
    parts = urlsplit(text)
    if parts.scheme.lower() != "http" or not parts.netloc:
        raise PeerError(400, "bad_request", "request target must be origin-form or http://")
    origin = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return origin.encode("ascii"), parts.netloc.lower()


def _normalized(origin: bytes) -> tuple[str, bytes]:
    """(the path policy judges, the target the backend gets): the same path,
    so what was judged is what is served; the query passes unchanged."""
    try:
        path = normalize_path(origin.decode("ascii"))
    except (BadPath, UnicodeDecodeError) as exc:
        raise PeerError(400, "bad_path", f"refused request path: {exc}") from exc
    _, sep, query = origin.partition(b"?")
    return path, path.encode("ascii") + sep + query


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_APPROVAL_NAME = APPROVAL_HEADER.lower().encode()  # as header_value compares
_STRIP_XFCC = frozenset({XFCC})  # the agent may not forge its caller identity upstream


def _gated(
    gate: Gate,
    policy: PolicySet,
    request: Request,
    path: str,
    upgrade: bool,
    *,
    peer: SpiffeId | None,
    svid_age: float | None,
    bundles: TrustBundleSet,
    max_body: int,
    base: Routed,
    peer_auth: str | None = None,
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
        peer_auth=peer_auth,
    )
    token_raw = header_value(request.headers, _APPROVAL_NAME)
    token = token_raw.decode("ascii", "replace") if token_raw else None

    def decide(body_hash: str | None, decision: RequestVerdict | None = None) -> Routed:
        verdict = gate.check(
            policy,
            facts,
            bundles=bundles,
            approval_token=token,
            target=path,
            body_hash=body_hash,
            decision=decision,
        )
        base.decision = verdict
        base.allow_upgrade = verdict.allowed and upgrade
        base.finish = None
        return base

    preview = policy.evaluate(facts, gate.policy_version)
    base.high_impact = preview.allowed and bool(preview.high_impact)
    needs_body = preview.allowed and any(step.approvers for _, step in preview.high_impact)
    if needs_body:
        base.decision = preview  # allowed so far; the gate decides with the body
        base.max_body = max_body
        base.finish = decide
        return base
    return decide(_EMPTY_SHA256, preview)


def emit_outcome(
    listener: BaseListener, conn: Conn, outcome: RequestOutcome, **overrides: object
) -> None:
    """One ``mcp.call`` record per JSON-RPC call, then the ``http.request``.
    A verdict that quarantined the caller is also logged (the policy package
    only reports it)."""
    for fields in (*outcome.calls, outcome.extra):
        if fields.get("quarantine_reason") is not None:
            verified = conn.tls.peer.verified if conn.tls is not None else None
            log.warning(
                "identity quarantined",
                peer=str(verified.spiffe_id) if verified is not None else "-",
                reason=fields["quarantine_reason"],
            )
            break
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
        outcome=outcome.outcome,
        bytes_up=outcome.bytes_up,
        bytes_down=outcome.bytes_down,
        duration_ms=outcome.duration_ms,
        error=outcome.error,
        **overrides,
        **outcome.extra,
    )


_GUARDS: tuple[type[McpGuard], type[A2aGuard]] | None = None


def _agent_guards() -> tuple[type[McpGuard], type[A2aGuard]]:
    """Imported on first use (only MCP and A2A listeners load the agent code:
    start-up time), then kept: an import statement costs 0.5 us a request."""
    global _GUARDS
    if _GUARDS is None:
        from proxy.http.a2a_flow import A2aGuard
        from proxy.http.mcp_flow import McpGuard

        _GUARDS = (McpGuard, A2aGuard)
    return _GUARDS


def _bearer_refused(error: JwtSvidError) -> RequestVerdict:
    """401 with the challenge RFC 6750 3 asks for (no error code when
    the request carried no token at all)."""
    from proxy.identity.jwt_svid import MISSING

    challenge = "Bearer" if error.reason == MISSING else 'Bearer error="invalid_token"'
    return dataclasses.replace(
        refused(error.reason, 401, str(error)), headers=(("www-authenticate", challenge),)
    )


class InboundRouter:
    def __init__(
        self,
        listener: InboundView,
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

    def route(self, request: Request, upgrade: bool) -> Routed:
        if request.method == b"CONNECT":
            return Routed(refused("connect_not_allowed"))
        origin, _ = _origin_form(request)
        path, target = _normalized(origin)
        listener = self.listener
        peer, auth = self.peer, "x509-svid"
        svid_age: float | None = self.svid_age
        jwt_fields: dict[str, object] = {}
        jwt = listener.config.jwt_svid
        if jwt is not None:
            # Imported here: only a listener with jwt_svid loads it (start-up time).
            from proxy.identity.jwt_svid import JwtSvidError, authenticate_bearer

            # The caller is who the JWT-SVID says, not the L7 hop that
            # holds the mTLS connection; the header is stripped either way.
            proof = authenticate_bearer(
                request.headers, listener.jwt_bundles(), jwt.audience, _dt.datetime.now(_dt.UTC)
            )
            if isinstance(proof, JwtSvidError):
                return Routed(_bearer_refused(proof), path=path)
            peer, auth, svid_age = proof.spiffe_id, "jwt-svid", None
            # The record's peer is the L7 hop (the connection); these name
            # the caller it vouched for, and the token only by its hash.
            jwt_fields = {
                "peer_auth": auth,
                "jwt_peer_id": str(peer),
                "jwt_digest": proof.digest,
                "jwt_exp": proof.expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        base = Routed(
            refused("no_matching_rule"),
            path=path,
            key=self.key,
            target=target,
            add_headers=(self.xfcc,),
            strip=listener.strip,
        )
        protocol = listener.config.protocol
        if protocol in ("mcp", "a2a"):
            mcp_guard, a2a_guard = _agent_guards()
            max_body = listener.config.max_body_bytes
            args = (lambda: listener.policy, listener.gate, peer, svid_age, self.bundles, max_body)
            if protocol == "mcp":
                base.hook = mcp_guard(*args, peer_auth=auth)
            else:
                base.hook = a2a_guard(*args, listener.tasks, peer_auth=auth)
            if request.method == b"POST":
                return base  # decided per JSON-RPC call
        # The policy is read per request, so a hot reload applies at once.
        routed = _gated(
            listener.gate,
            listener.policy,
            request,
            path,
            upgrade,
            peer=peer,
            svid_age=svid_age,
            bundles=self.bundles,
            max_body=listener.config.max_body_bytes,
            base=base,
            peer_auth=auth,
        )
        if not jwt_fields:
            return routed
        from proxy.credentials.egress import with_route_credential  # as in _finish

        return with_route_credential(routed, None, jwt_fields)


class OutboundRouter:
    def __init__(
        self,
        config: OutboundConfig,
        gate: Gate,
        identity: IdentityState,
        providers: dict[str, CredentialProvider] | None = None,
    ) -> None:
        self.gate = gate
        self.providers = providers or {}
        self.identity = identity
        self.proxy_mode = config.protocol == "http-proxy"
        self.routes = {r.host: r for r in config.routes if r.host is not None}
        self.single = config.routes[0] if not self.proxy_mode else None

    @cached_property
    def tasks(self) -> TaskOwnership:
        """A2A: who created which task (made on first use, as the listener's)."""
        from proxy.agent.a2a import TaskOwnership

        return TaskOwnership()

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

    def route(self, request: Request, upgrade: bool) -> Routed:
        if request.method == b"CONNECT":
            return Routed(refused("connect_not_allowed"))
        origin, host = _origin_form(request)
        if host is None:
            raw_host = header_value(request.headers, b"host")
            host = raw_host.decode("ascii", "replace").lower() if raw_host else None
        route = self._lookup(host)
        path, target = _normalized(origin)
        if route is None or route.policy is None:
            return Routed(refused("egress_not_allowed"), path=path, label=host)
        base = Routed(
            refused("no_matching_rule"),
            path=path,
            key=route.name,
            target=target,
            strip=_STRIP_XFCC,
            label=str(route.target),
        )
        snapshot = self.identity.current
        if route.protocol in ("mcp", "a2a"):
            mcp_guard, a2a_guard = _agent_guards()
            policy = route.policy
            args = (lambda: policy, self.gate, None, None, snapshot.bundles, route.max_body_bytes)
            if route.protocol == "mcp":
                base.hook = mcp_guard(*args)
            else:
                base.hook = a2a_guard(*args, self.tasks)
            if request.method == b"POST":  # decided per JSON-RPC call
                return self._finish(route, base, hooked=True)
        routed = _gated(
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
        return self._finish(route, routed)

    def _finish(self, route: RouteConfig, routed: Routed, *, hooked: bool = False) -> Routed:
        """The route's credential (after policy allowed) and upstream audit fields."""
        provider = self.providers.get(route.name)
        if provider is None and route.upstream_tls.mode != "dns":
            return routed  # nothing to add: no credential, no DNS audit fields
        # Imported here: only credentials and DNS upstreams load it (start-up time).
        from proxy.credentials.egress import dns_audit_fields, with_route_credential

        fields = dns_audit_fields(route.upstream_tls)
        return with_route_credential(routed, provider, fields, hooked=hooked)
