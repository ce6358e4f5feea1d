"""``[[inbound]]`` and ``[[outbound]]`` listeners and their routes.

Security choices enforced here (invariant 4): plaintext listeners (the
outbound listeners) bind loopback, and inbound targets are loopback, unless
the configuration says otherwise in so many words (``allow_public_listen``,
``allow_remote_target``). Least privilege: HTTP rules and routes must name
their methods and paths; there is no implicit "everything".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, Literal

from proxy.config.rules import GUARD_KEYS, guard_elsewhere, guard_rule, http_only, patterns
from proxy.config.schema import (
    DEFAULT_MAX_BODY_BYTES,
    HOSTNAME_RE,
    HTTP_FAMILY,
    TOKEN_RE,
    XFCC,
    AdminConfig,
    HttpLimits,
    InboundConfig,
    InboundProtocol,
    OutboundConfig,
    PoolConfig,
    RouteConfig,
    RouteProtocol,
)
from proxy.config.walker import MISSING, Ctx, Table
from proxy.policy.conditions import SCHEMA
from proxy.policy.evaluate import PolicySet
from proxy.policy.rules import GuardRule

_LIMIT_KEYS = (
    "max_header_bytes",
    "max_headers",
    "idle_timeout",
    "request_timeout",
    "response_timeout",
)


def _limits(t: Table) -> HttpLimits:
    d = HttpLimits()
    return HttpLimits(
        max_header_bytes=t.integer("max_header_bytes", default=d.max_header_bytes, minimum=1024),
        max_headers=t.integer("max_headers", default=d.max_headers),
        idle_timeout=t.duration("idle_timeout", default=d.idle_timeout),
        request_timeout=t.duration("request_timeout", default=d.request_timeout),
        response_timeout=t.duration("response_timeout", default=d.response_timeout),
        max_connection_lifetime=_lifetime(t),
    )


def _lifetime(t: Table) -> float | None:
    # Continuous authentication applies to every protocol, TCP included.
    return t.duration("max_connection_lifetime", default=None)


def _common(t: Table) -> dict[str, Any]:
    min_tls = t.get("min_tls")
    if min_tls is MISSING:
        min_tls = "1.3"
    elif isinstance(min_tls, float) and min_tls in (1.2, 1.3):
        min_tls = str(min_tls)  # min_tls = 1.3 (unquoted) means what it says
    if min_tls not in ("1.2", "1.3"):
        t.fail("min_tls", f'expected "1.2" or "1.3", got {min_tls!r}')
    return {
        "handshake_timeout": t.duration("handshake_timeout", default=10.0),
        "connect_timeout": t.duration("connect_timeout", default=10.0),
        "max_connections": t.integer("max_connections", default=4096),
        "min_tls": min_tls,
        # A receiver that reads nothing this long is cut off (write_timeout).
        "write_timeout": t.duration("write_timeout", default=60.0),
    }


def _max_body(t: Table) -> int:
    return t.integer("max_body_bytes", default=DEFAULT_MAX_BODY_BYTES, minimum=1024)


def inbound_section(t: Table) -> InboundConfig:
    name = t.name()
    listen = t.address("listen", zero_port=True, any_host=True)
    target = t.address("target", zero_port=False)
    protocol: InboundProtocol = t.get("protocol")
    if protocol not in ("mcp", "a2a"):
        protocol = t.choice(
            "protocol", ("tcp", "http"), more=' (or an agent protocol over HTTP: "mcp", "a2a")'
        )
    allow_remote = t.boolean("allow_remote_target")
    # Invariant 4: what we relay to the target is plaintext.
    if not target.is_loopback() and not allow_remote:
        t.fail(
            "target",
            f"{target} is not a loopback address; traffic to the target is plaintext "
            "(set allow_remote_target = true to relay off this host)",
        )
    common = _common(t)
    http_family = protocol in HTTP_FAMILY
    # A2A decisions read the JSON-RPC method as mcp.method (v1.0 names).
    roots = frozenset(r for r in SCHEMA if r != "mcp" or protocol in ("mcp", "a2a"))
    guard_rules: list[GuardRule] = []
    for i, rt in enumerate(t.tables("rules")):
        rule_name = rt.name(default=f"{name}.rules[{i}]")
        peers = patterns(rt, "peers")
        if any(r.name == rule_name for r in guard_rules):
            rt.fail("name", f"rule name {rule_name!r} is used twice in this listener")
        if http_family:
            guard_rules.append(guard_rule(rt, rule_name, protocol, peers, roots))
            elsewhere = guard_elsewhere(protocol)
        else:
            guard_rules.append(GuardRule(rule_name, peers))
            elsewhere = http_only(protocol, ("methods", "paths", "allow_upgrade", *GUARD_KEYS))
        rt.done(allowed_elsewhere=elsewhere)
    if not guard_rules:
        t.missing("rules", "at least one [[inbound.rules]] table is required (no rule, no traffic)")
    limits = HttpLimits(max_connection_lifetime=_lifetime(t))
    headers_t: tuple[str, ...] = (XFCC,)
    max_body = DEFAULT_MAX_BODY_BYTES
    if http_family:
        limits = _limits(t)
        extra = t.strings("identity_headers", required=False, nonempty=False)
        for i, header in enumerate(extra):
            if not TOKEN_RE.match(header):
                t.ctx.fail(f"{t.at('identity_headers')}[{i}]", f"invalid header name {header!r}")
        headers_t = tuple(dict.fromkeys([XFCC, *(h.lower() for h in extra)]))
        max_body = _max_body(t)
    t.done(
        allowed_elsewhere=http_only(protocol, (*_LIMIT_KEYS, "identity_headers", "max_body_bytes"))
    )
    return InboundConfig(
        name=name,
        listen=listen,
        target=target,
        protocol=protocol,
        allow_remote_target=allow_remote,
        identity_headers=headers_t,
        limits=limits,
        guard=PolicySet(guard_rules),
        max_body_bytes=max_body,
        **common,
    )


def _route_host(t: Table) -> str:
    text: str = t.string("host", nonempty=True)
    host = text.lower()
    port = ""
    if host.startswith("["):
        end = host.find("]")
        inner, rest = host[1:end], host[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            t.fail("host", f"invalid host {text!r}: expected [IPv6] or [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            t.fail("host", f"invalid host {text!r}: {inner!r} is not an IPv6 address")
        port = rest[1:] if rest else ""
        name_ok = True
    else:
        name, sep, port = host.partition(":")
        if sep and not port:
            t.fail("host", f"invalid host {text!r}: empty port")
        name_ok = bool(HOSTNAME_RE.match(name)) and len(name) <= 253
    if not name_ok:
        t.fail("host", f"invalid host {text!r}: expected a host name or IP, optionally :PORT")
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        t.fail("host", f"invalid host {text!r}: port must be 1-65535")
    return host


def outbound_section(t: Table) -> OutboundConfig:
    name = t.name()
    listen = t.address("listen", zero_port=True, any_host=True)
    protocol: Literal["tcp", "http", "http-proxy"] = t.choice(
        "protocol", ("tcp", "http", "http-proxy")
    )
    allow_public = t.boolean("allow_public_listen")
    # Invariant 4: the agent talks plaintext to this listener.
    if not listen.is_loopback() and not allow_public:
        what = (
            f"{listen} listens on every address"
            if not listen.host
            else f"{listen} is not a loopback address"
        )
        t.fail(
            "listen",
            f"{what}; this listener is plaintext (listen on 127.0.0.1:{listen.port}, "
            "or set allow_public_listen = true to expose it)",
        )
    common = _common(t)
    routes: list[RouteConfig] = []
    hosts: set[str] = set()
    for i, rt in enumerate(t.tables("routes")):
        route_name = rt.name(default=f"{name}.routes[{i}]")
        host: str | None = None
        if protocol == "http-proxy":
            host = _route_host(rt)
            if host in hosts:
                rt.fail("host", f"host {host!r} has two routes in this listener")
            hosts.add(host)
        target = rt.address("target", zero_port=False)
        expect = patterns(rt, "expect")
        if any(r.name == route_name for r in routes):
            rt.fail("name", f"route name {route_name!r} is used twice in this listener")
        if protocol != "tcp":
            route_protocol: RouteProtocol = rt.choice("protocol", HTTP_FAMILY, default="http")
            # The agent is the only client of an outbound listener: no peer selectors,
            # and no "peer" in conditions (the upstream is checked by expect).
            roots = frozenset(
                r for r in SCHEMA if r != "peer" and (r != "mcp" or route_protocol == "mcp")
            )
            grule = guard_rule(rt, route_name, route_protocol, (), roots)
            routes.append(
                RouteConfig(
                    route_name,
                    host,
                    target,
                    expect,
                    protocol=route_protocol,
                    guard_rule=grule,
                    policy=PolicySet((grule,)),
                    max_body_bytes=_max_body(rt),
                )
            )
            elsewhere = guard_elsewhere(route_protocol)
        else:
            routes.append(RouteConfig(route_name, host, target, expect, protocol="tcp"))
            elsewhere = http_only(
                protocol, ("methods", "paths", "allow_upgrade", "protocol", *GUARD_KEYS)
            )
        if protocol != "http-proxy":
            elsewhere["host"] = (
                f'only for protocol = "http-proxy"; a "{protocol}" listener has one fixed target'
            )
        rt.done(allowed_elsewhere=elsewhere)
    if not routes:
        t.missing(
            "routes",
            "at least one [[outbound.routes]] table is required (egress is deny by default)",
        )
    if protocol != "http-proxy" and len(routes) > 1:
        t.fail(
            "routes",
            f'protocol = "{protocol}" takes exactly one route, got {len(routes)} '
            '(use protocol = "http-proxy" to route by host)',
        )
    limits, pool = HttpLimits(max_connection_lifetime=_lifetime(t)), PoolConfig()
    if protocol != "tcp":
        limits = _limits(t)
        pt = t.table("pool")
        if pt is not None:
            d = PoolConfig()
            pool = PoolConfig(
                max_idle_per_route=pt.integer(
                    "max_idle_per_route", default=d.max_idle_per_route, minimum=0
                ),
                idle_timeout=pt.duration("idle_timeout", default=d.idle_timeout),
                max_per_route=pt.integer("max_per_route", default=d.max_per_route),
            )
            pt.done()
    t.done(allowed_elsewhere=http_only(protocol, (*_LIMIT_KEYS, "pool")))
    return OutboundConfig(
        name=name,
        listen=listen,
        protocol=protocol,
        routes=tuple(routes),
        allow_public_listen=allow_public,
        limits=limits,
        pool=pool,
        **common,
    )


def check_unique(
    ctx: Ctx,
    admin: AdminConfig,
    inbound: Sequence[InboundConfig],
    outbound: Sequence[OutboundConfig],
) -> None:
    names: dict[str, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    if admin.listen is not None and admin.listen.port:
        addresses[(admin.listen.host.lower(), admin.listen.port)] = "admin.listen"
    listeners: list[tuple[str, InboundConfig | OutboundConfig]] = [
        *((f"inbound[{i}]", c) for i, c in enumerate(inbound)),
        *((f"outbound[{i}]", c) for i, c in enumerate(outbound)),
    ]
    for where, cfg in listeners:
        if cfg.name in names:
            ctx.fail(
                f"{where}.name", f"listener name {cfg.name!r} is also used by {names[cfg.name]}"
            )
        names[cfg.name] = where
        key = (cfg.listen.host.lower(), cfg.listen.port)
        if cfg.listen.port and key in addresses:
            ctx.fail(f"{where}.listen", f"{cfg.listen} is also used by {addresses[key]}")
        addresses[key] = f"{where}.listen"
