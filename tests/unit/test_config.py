"""Config parsing: the full shape parses into frozen objects; every bad input
is one ConfigError line that names the file and the key path."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    AdminConfig,
    AuditConfig,
    Config,
    ConfigError,
    HttpLimits,
    IdentityConfig,
    InboundConfig,
    OutboundConfig,
    PoolConfig,
    RouteConfig,
    load_config,
    parse_config,
    summarize,
)
from proxy.errors import UsageError
from proxy.identity import SpiffeId, TrustDomain
from proxy.netaddr import HostPort
from proxy.policy import SpiffePattern
from proxy.policy.paths import PathPattern

PAYROLL = "spiffe://payroll.example/agent/payroll"
HR = "spiffe://payroll.example/svc/hr"

FULL_TOML = f"""
[identity]
source = "files"
cert = "svid.pem"
key = "svid_key.pem"
bundle = "bundle.pem"
[identity.federation]
"partner.example" = "partner-bundle.pem"
[admin]
listen = "127.0.0.1:7070"
[audit]
path = "-"
[[inbound]]
name = "hr-api"
listen = "0.0.0.0:8443"
target = "127.0.0.1:8080"
protocol = "http"
[[inbound.rules]]
peers = ["{PAYROLL}"]
methods = ["GET"]
paths = ["/timesheets/**"]
[[outbound]]
name = "egress"
listen = "127.0.0.1:7071"
protocol = "http-proxy"
[[outbound.routes]]
host = "hr-api"
target = "hr.payroll.svc:8443"
expect = ["{HR}"]
methods = ["GET"]
paths = ["/timesheets/**"]
"""

BASE: dict[str, Any] = {
    "identity": {
        "source": "files",
        "cert": "svid.pem",
        "key": "svid_key.pem",
        "bundle": "bundle.pem",
        "federation": {"partner.example": "partner-bundle.pem"},
    },
    "admin": {"listen": "127.0.0.1:7070"},
    "audit": {"path": "-"},
    "inbound": [
        {
            "name": "hr-api",
            "listen": "0.0.0.0:8443",
            "target": "127.0.0.1:8080",
            "protocol": "http",
            "rules": [
                {"peers": [PAYROLL], "methods": ["GET"], "paths": ["/timesheets/**"]},
                {"name": "writes", "peers": [PAYROLL], "methods": ["POST"], "paths": ["/x"]},
            ],
        }
    ],
    "outbound": [
        {
            "name": "egress",
            "listen": "127.0.0.1:7071",
            "protocol": "http-proxy",
            "routes": [
                {
                    "host": "hr-api",
                    "target": "hr.payroll.svc:8443",
                    "expect": [HR],
                    "methods": ["GET"],
                    "paths": ["/timesheets/**"],
                }
            ],
        }
    ],
}

TCP_IN: dict[str, Any] = {
    "name": "l4-in",
    "listen": "0.0.0.0:9443",
    "target": "127.0.0.1:9080",
    "protocol": "tcp",
    "rules": [{"peers": [PAYROLL]}],
}
TCP_OUT: dict[str, Any] = {
    "name": "l4-out",
    "listen": "127.0.0.1:15002",
    "protocol": "tcp",
    "routes": [{"target": "hr.payroll.svc:8443", "expect": [HR]}],
}
HTTP_OUT: dict[str, Any] = {
    "name": "hr-port",
    "listen": "127.0.0.1:15003",
    "protocol": "http",
    "routes": [
        {"target": "hr.payroll.svc:8443", "expect": [HR], "methods": ["GET"], "paths": ["/**"]}
    ],
}

Mutation = Callable[[dict[str, Any]], None]


def _walk(data: Any, path: str) -> tuple[Any, str | int]:
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part in parts[:-1]:
        data = data[part]
    return data, parts[-1]


def put(path: str, value: Any) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        parent, last = _walk(data, path)
        parent[last] = copy.deepcopy(value)

    return apply


def drop(path: str) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        parent, last = _walk(data, path)
        del parent[last]

    return apply


def append(path: str, value: Any) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        parent, last = _walk(data, path)
        parent[last].append(copy.deepcopy(value))

    return apply


def build(*mutations: Mutation) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for mutate in mutations:
        mutate(data)
    return data


def parse(*mutations: Mutation) -> Config:
    return parse_config(build(*mutations), "sidecar.toml", base_dir=Path("/etc/agent"))


# -- the happy path ---------------------------------------------------------


def test_full_config_parses_into_frozen_objects(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(FULL_TOML)
    config = load_config(path)
    payroll = SpiffePattern.parse(PAYROLL)
    timesheets = (PathPattern.parse("/timesheets/**"),)
    assert config == Config(
        source=str(path),
        identity=IdentityConfig(
            source="files",
            cert=tmp_path / "svid.pem",
            key=tmp_path / "svid_key.pem",
            bundle=tmp_path / "bundle.pem",
            federation={TrustDomain("partner.example"): tmp_path / "partner-bundle.pem"},
            ttl=timedelta(hours=1),
        ),
        admin=AdminConfig(HostPort("127.0.0.1", 7070)),
        audit=AuditConfig("-"),
        inbound=(
            InboundConfig(
                name="hr-api",
                listen=HostPort("0.0.0.0", 8443),
                target=HostPort("127.0.0.1", 8080),
                protocol="http",
            ),
        ),
        outbound=(
            OutboundConfig(
                name="egress",
                listen=HostPort("127.0.0.1", 7071),
                protocol="http-proxy",
                routes=(
                    RouteConfig(
                        name="egress.routes[0]",
                        host="hr-api",
                        target=HostPort("hr.payroll.svc", 8443),
                        expect=(SpiffePattern.parse(HR),),
                    ),
                ),
            ),
        ),
    )
    assert config.drain_timeout == 15.0 and config.log_level == "info"
    assert config.inbound[0].limits == HttpLimits()
    assert config.inbound[0].identity_headers == ("x-forwarded-client-cert",)
    assert config.outbound[0].pool == PoolConfig()
    (rule,) = config.inbound[0].guard.rules
    assert (rule.name, rule.peers, rule.methods, rule.paths) == (
        "hr-api.rules[0]",
        (payroll,),
        frozenset({"GET"}),
        timesheets,
    )
    route_rule = config.outbound[0].routes[0].guard_rule
    assert route_rule is not None and route_rule.name == "egress.routes[0]"
    assert (route_rule.peers, route_rule.methods, route_rule.paths) == (
        (),
        frozenset({"GET"}),
        timesheets,
    )


def test_config_is_frozen() -> None:
    config = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.identity.federation[TrustDomain("x.example")] = Path("/x")  # type: ignore[index]
    assert isinstance(config.inbound, tuple) and isinstance(config.inbound[0].guard.rules, tuple)
    assert isinstance(config.inbound[0].guard.rules[0].methods, frozenset)


def test_every_option() -> None:
    inbound = {
        **BASE["inbound"][0],
        "handshake_timeout": "5s",
        "connect_timeout": 2,
        "max_connections": 10,
        "min_tls": "1.2",
        "identity_headers": ["X-Caller-Id", "x-forwarded-client-cert"],
        "max_header_bytes": 8192,
        "max_headers": 50,
        "idle_timeout": "1m",
        "request_timeout": 5.5,
        "response_timeout": "2m",
        "max_connection_lifetime": "1h",
    }
    inbound["rules"] = [
        {
            "name": "ws",
            "peers": ["spiffe://payroll.example/agent/*", "spiffe://partner.example/**"],
            "methods": ["GET", "*"],
            "paths": ["/ws", "/api/*.json"],
            "allow_upgrade": True,
        }
    ]
    outbound = {
        **BASE["outbound"][0],
        "min_tls": 1.3,
        "pool": {"max_idle_per_route": 0, "idle_timeout": "10s", "max_per_route": 8},
        "allow_public_listen": True,
        "listen": "0.0.0.0:7071",
    }
    outbound["routes"] = [
        {**outbound["routes"][0], "name": "hr", "host": "HR-API:8080", "allow_upgrade": True},
        {**outbound["routes"][0], "host": "[::1]:80"},
    ]
    config = parse(
        put("inbound", [inbound]),
        put("outbound", [outbound, TCP_OUT, HTTP_OUT]),
        append("inbound", {**TCP_IN, "target": "10.0.0.5:80", "allow_remote_target": True}),
        put("admin", {"listen": "0.0.0.0:9901", "allow_public": True}),
        put("audit", {"path": "audit/records.jsonl"}),
        put("drain_timeout", "0s"),
        put("log_level", "DEBUG"),
    )
    inb = config.inbound[0]
    assert (inb.handshake_timeout, inb.connect_timeout, inb.max_connections) == (5.0, 2.0, 10)
    assert inb.min_tls == "1.2"
    assert inb.identity_headers == ("x-forwarded-client-cert", "x-caller-id")
    assert inb.limits == HttpLimits(8192, 50, 60.0, 5.5, 120.0, 3600.0)
    rule = inb.guard.rules[0]
    assert rule.name == "ws" and rule.allow_upgrade and rule.methods == {"GET", "*"}
    assert [p.text for p in rule.paths] == ["/ws", "/api/*.json"]
    out = config.outbound[0]
    assert out.min_tls == "1.3" and out.allow_public_listen
    assert out.pool == PoolConfig(0, 10.0, 8)
    assert [r.host for r in out.routes] == ["hr-api:8080", "[::1]:80"]
    assert [r.name for r in out.routes] == ["hr", "egress.routes[1]"]
    hr_rule = out.routes[0].guard_rule
    assert hr_rule is not None and hr_rule.allow_upgrade
    tcp_out, http_out = config.outbound[1], config.outbound[2]
    assert tcp_out.routes[0].guard_rule is None and tcp_out.routes[0].host is None
    assert http_out.routes[0].guard_rule is not None and http_out.routes[0].host is None
    tcp_in = config.inbound[1]
    assert tcp_in.allow_remote_target
    assert tcp_in.guard.rules[0].peers == (SpiffePattern.parse(PAYROLL),)
    assert config.admin == AdminConfig(HostPort("0.0.0.0", 9901))
    assert config.audit == AuditConfig("/etc/agent/audit/records.jsonl")
    assert config.drain_timeout == 0.0 and config.log_level == "debug"


def test_dev_identity_defaults(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(
        FULL_TOML.replace(
            '[identity]\nsource = "files"\ncert = "svid.pem"\nkey = "svid_key.pem"\n'
            'bundle = "bundle.pem"\n[identity.federation]\n"partner.example" = '
            '"partner-bundle.pem"\n',
            f'[identity]\nspiffe_id = "{PAYROLL}"\n',
        )
    )
    identity = load_config(path).identity
    assert identity == IdentityConfig(
        source="dev",
        spiffe_id=SpiffeId.parse(PAYROLL),
        state_dir=tmp_path / ".agent-proxy-dev",
        ttl=timedelta(hours=1),
    )


def test_dev_identity_options() -> None:
    identity = parse(
        put(
            "identity",
            {"source": "dev", "spiffe_id": PAYROLL, "state_dir": "/var/lib/ap", "ttl": "30m"},
        )
    ).identity
    assert identity.state_dir == Path("/var/lib/ap") and identity.ttl == timedelta(minutes=30)


@pytest.mark.parametrize(
    "endpoint",
    [
        None,
        "unix:///run/spire/agent.sock",
        "unix:/run/agent.sock",
        "tcp://127.0.0.1:8081",
        "tcp://[::1]:8081",
    ],
)
def test_workload_api_endpoints(endpoint: str | None) -> None:
    table = {"source": "workload-api"}
    if endpoint is not None:
        table["endpoint"] = endpoint
    identity = parse(put("identity", table)).identity
    assert identity.source == "workload-api" and identity.endpoint == endpoint


def test_admin_can_be_disabled() -> None:
    assert parse(put("admin", {"listen": ""})).admin.listen is None
    assert parse(put("admin", {"enabled": False})).admin.listen is None
    assert parse(drop("admin")).admin == AdminConfig(HostPort("127.0.0.1", 7070))


def test_relative_paths_resolve_against_the_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "sidecar.toml").write_text(
        FULL_TOML.replace('cert = "svid.pem"', 'cert = "certs/svid.pem"').replace(
            'bundle = "bundle.pem"', 'bundle = "/abs/bundle.pem"'
        )
    )
    monkeypatch.chdir(tmp_path)  # a relative path to the config file, from elsewhere
    identity = load_config("conf/sidecar.toml").identity
    assert identity.cert == conf_dir / "certs" / "svid.pem"
    assert identity.key == conf_dir / "svid_key.pem"
    assert identity.bundle == Path("/abs/bundle.pem")
    assert identity.federation[TrustDomain("partner.example")] == conf_dir / "partner-bundle.pem"


def test_summary_mentions_everything() -> None:
    text = summarize(parse(append("outbound", TCP_OUT), append("inbound", TCP_IN)))
    for needle in [
        "identity: source files",
        "/etc/agent/svid.pem",
        "federation partner.example /etc/agent/partner-bundle.pem",
        "admin: http://127.0.0.1:7070",
        "audit: stdout",
        "inbound hr-api (http): 0.0.0.0:8443 -> 127.0.0.1:8080",
        "2 rules:",
        f"hr-api.rules[0]: peers {PAYROLL}; methods GET; paths /timesheets/**",
        "writes:",
        "inbound l4-in (tcp): 0.0.0.0:9443 -> 127.0.0.1:9080",
        "outbound egress (http-proxy): 127.0.0.1:7071",
        f"egress.routes[0]: hr-api -> hr.payroll.svc:8443 expecting {HR}",
        f"l4-out.routes[0]: -> hr.payroll.svc:8443 expecting {HR}",
    ]:
        assert needle in text, needle


# -- errors: one line, file and key path ------------------------------------

IN = "inbound.0"
RULE = "inbound.0.rules.1"
OUT = "outbound.0"
ROUTE = "outbound.0.routes.0"

ERRORS: list[tuple[str, list[Mutation], str]] = [
    # unknown keys, at every level
    ("unknown top", [put("inbund", [])], "unknown key 'inbund'"),
    (
        "unknown in rule",
        [put(f"{RULE}.metods", ["GET"])],
        "unknown key 'inbound[0].rules[1].metods' (did you mean 'methods'?)",
    ),
    (
        "unknown in route",
        [put(f"{ROUTE}.expected", [HR])],
        "unknown key 'outbound[0].routes[0].expected'",
    ),
    ("unknown in listener", [put(f"{IN}.tagret", "x")], "unknown key 'inbound[0].tagret'"),
    ("unknown in admin", [put("admin.port", 1)], "unknown key 'admin.port'"),
    ("unknown in audit", [put("audit.file", "x")], "unknown key 'audit.file'"),
    ("unknown in pool", [put(f"{OUT}.pool", {"size": 1})], "unknown key 'outbound[0].pool.size'"),
    (
        "unknown in identity",
        [put("identity.certificate", "x")],
        "unknown key 'identity.certificate'",
    ),
    # wrong types
    (
        "methods not a list",
        [put(f"{RULE}.methods", "GET")],
        "inbound[0].rules[1].methods: expected a list of strings",
    ),
    (
        "methods of ints",
        [put(f"{RULE}.methods", [1])],
        "inbound[0].rules[1].methods: expected a list of strings",
    ),
    (
        "name not a string",
        [put(f"{IN}.name", 3)],
        "inbound[0].name: expected a string, got an integer",
    ),
    (
        "bool not a string",
        [put(f"{OUT}.listen", True)],
        "outbound[0].listen: expected a string, got a boolean",
    ),
    (
        "max_connections float",
        [put(f"{IN}.max_connections", 1.5)],
        "inbound[0].max_connections: expected an integer, got a float",
    ),
    (
        "max_connections bool",
        [put(f"{IN}.max_connections", True)],
        "inbound[0].max_connections: expected an integer, got a boolean",
    ),
    (
        "max_connections zero",
        [put(f"{IN}.max_connections", 0)],
        "inbound[0].max_connections: must be at least 1, got 0",
    ),
    (
        "allow_upgrade string",
        [put(f"{RULE}.allow_upgrade", "yes")],
        "inbound[0].rules[1].allow_upgrade: expected true or false, got a string",
    ),
    (
        "inbound a table",
        [put("inbound", {"name": "x"})],
        "inbound: expected an array of tables ([[inbound]])",
    ),
    (
        "rules a table",
        [put(f"{IN}.rules", {"peers": [PAYROLL]})],
        "inbound[0].rules: expected an array of tables ([[inbound.rules]])",
    ),
    (
        "identity not a table",
        [put("identity", "files")],
        "identity: expected a table ([identity]), got a string",
    ),
    (
        "protocol unknown",
        [put(f"{IN}.protocol", "grpc")],
        'inbound[0].protocol: expected one of "tcp", "http", got \'grpc\'',
    ),
    (
        "outbound protocol unknown",
        [put(f"{OUT}.protocol", "socks")],
        'outbound[0].protocol: expected one of "tcp", "http", "http-proxy", got \'socks\'',
    ),
    (
        "min_tls",
        [put(f"{IN}.min_tls", "1.1")],
        'inbound[0].min_tls: expected "1.2" or "1.3", got \'1.1\'',
    ),
    (
        "log_level",
        [put("log_level", "verbose")],
        "log_level: expected one of debug, info, warning, error, got 'verbose'",
    ),
    ("bad listener name", [put(f"{IN}.name", "hr api")], "inbound[0].name: invalid name 'hr api'"),
    (
        "identity_headers bad",
        [put(f"{IN}.identity_headers", ["x y"])],
        "inbound[0].identity_headers[0]: invalid header name 'x y'",
    ),
    # missing required keys
    ("missing listen", [drop(f"{IN}.listen")], "inbound[0].listen: required"),
    ("missing target", [drop(f"{IN}.target")], "inbound[0].target: required"),
    ("missing protocol", [drop(f"{OUT}.protocol")], "outbound[0].protocol: required"),
    ("missing name", [drop(f"{OUT}.name")], "outbound[0].name: required"),
    ("missing peers", [drop(f"{RULE}.peers")], "inbound[0].rules[1].peers: required"),
    ("empty peers", [put(f"{RULE}.peers", [])], "inbound[0].rules[1].peers: must not be empty"),
    ("missing methods", [drop(f"{RULE}.methods")], "inbound[0].rules[1].methods: required"),
    ("missing paths", [drop(f"{RULE}.paths")], "inbound[0].rules[1].paths: required"),
    ("no rules", [drop(f"{IN}.rules")], "inbound[0].rules: at least one"),
    ("missing expect", [drop(f"{ROUTE}.expect")], "outbound[0].routes[0].expect: required"),
    (
        "empty expect",
        [put(f"{ROUTE}.expect", [])],
        "outbound[0].routes[0].expect: must not be empty",
    ),
    ("missing route target", [drop(f"{ROUTE}.target")], "outbound[0].routes[0].target: required"),
    ("no routes", [put(f"{OUT}.routes", [])], "outbound[0].routes: at least one"),
    ("no listeners", [drop("inbound"), drop("outbound")], "no listeners"),
    ("missing host", [drop(f"{ROUTE}.host")], "outbound[0].routes[0].host: required"),
    # bad patterns, paths, methods, addresses
    (
        "bad peer pattern",
        [put(f"{RULE}.peers", [PAYROLL, "spiffe://payroll.example/a*/b"])],
        "inbound[0].rules[1].peers[1]: invalid SPIFFE ID pattern",
    ),
    (
        "bad expect pattern",
        [put(f"{ROUTE}.expect", ["https://payroll.example/svc/hr"])],
        "outbound[0].routes[0].expect[0]: invalid SPIFFE ID pattern",
    ),
    (
        "bad path",
        [put(f"{RULE}.paths", ["timesheets"])],
        "inbound[0].rules[1].paths[0]: path pattern 'timesheets' must start with '/'",
    ),
    (
        "bad path wildcard",
        [put(f"{ROUTE}.paths", ["/a/**b"])],
        "outbound[0].routes[0].paths[0]: path pattern '/a/**b'",
    ),
    (
        "bad method",
        [put(f"{RULE}.methods", ["GET", "GE T"])],
        "inbound[0].rules[1].methods[1]: invalid HTTP method 'GE T'",
    ),
    (
        "lowercase method",
        [put(f"{ROUTE}.methods", ["get"])],
        "outbound[0].routes[0].methods[0]: HTTP methods are case-sensitive",
    ),
    ("bad listen", [put(f"{IN}.listen", "8443")], "inbound[0].listen: invalid address '8443'"),
    (
        "bad target port",
        [put(f"{ROUTE}.target", "hr:0")],
        "outbound[0].routes[0].target: invalid address",
    ),
    ("bad admin listen", [put("admin.listen", "localhost")], "admin.listen: invalid address"),
    (
        "bad route host",
        [put(f"{ROUTE}.host", "hr api")],
        "outbound[0].routes[0].host: invalid host",
    ),
    (
        "bad route host port",
        [put(f"{ROUTE}.host", "hr:99999")],
        "outbound[0].routes[0].host: invalid host 'hr:99999': port must be 1-65535",
    ),
    # invariant 4
    (
        "remote target",
        [put(f"{IN}.target", "10.0.0.5:8080")],
        "inbound[0].target: 10.0.0.5:8080 is not a loopback address",
    ),
    (
        "remote target by name",
        [put(f"{IN}.target", "hr.internal:8080")],
        "inbound[0].target: hr.internal:8080 is not a loopback address",
    ),
    (
        "public outbound listen",
        [put(f"{OUT}.listen", "0.0.0.0:7071")],
        "outbound[0].listen: 0.0.0.0:7071 is not a loopback address",
    ),
    (
        "public admin",
        [put("admin.listen", "0.0.0.0:7070")],
        "admin.listen: 0.0.0.0:7070 is not a loopback address",
    ),
    # uniqueness
    (
        "duplicate names",
        [append("outbound", {**TCP_OUT, "name": "hr-api"})],
        "outbound[1].name: listener name 'hr-api' is also used by inbound[0]",
    ),
    (
        "duplicate listen",
        [append("outbound", {**TCP_OUT, "listen": "127.0.0.1:7071"})],
        "outbound[1].listen: 127.0.0.1:7071 is also used by outbound[0].listen",
    ),
    (
        "listen clashes with admin",
        [put(f"{OUT}.listen", "127.0.0.1:7070")],
        "outbound[0].listen: 127.0.0.1:7070 is also used by admin.listen",
    ),
    (
        "duplicate route hosts",
        [append(f"{OUT}.routes", {**BASE["outbound"][0]["routes"][0], "host": "HR-API"})],
        "outbound[0].routes[1].host: host 'hr-api' has two routes in this listener",
    ),
    (
        "duplicate rule names",
        [put(f"{IN}.rules.0.name", "writes")],
        "inbound[0].rules[1].name: rule name 'writes' is used twice in this listener",
    ),
    # protocol-specific keys
    (
        "tcp listener with methods",
        [put("inbound", [{**TCP_IN, "rules": [{"peers": [PAYROLL], "methods": ["GET"]}]}])],
        'inbound[0].rules[0].methods: only valid for HTTP listeners, not protocol = "tcp"',
    ),
    (
        "tcp listener with limits",
        [put("inbound", [{**TCP_IN, "idle_timeout": 5}])],
        "inbound[0].idle_timeout: only valid for HTTP listeners",
    ),
    (
        "tcp route with paths",
        [put("outbound", [{**TCP_OUT, "routes": [{**TCP_OUT["routes"][0], "paths": ["/"]}]}])],
        "outbound[0].routes[0].paths: only valid for HTTP listeners",
    ),
    (
        "tcp route with host",
        [put("outbound", [{**TCP_OUT, "routes": [{**TCP_OUT["routes"][0], "host": "hr"}]}])],
        'outbound[0].routes[0].host: only for protocol = "http-proxy"',
    ),
    (
        "tcp outbound with pool",
        [put("outbound", [{**TCP_OUT, "pool": {}}])],
        "outbound[0].pool: only valid for HTTP listeners",
    ),
    (
        "http route without paths",
        [
            put(
                "outbound",
                [{**HTTP_OUT, "routes": [{"target": "hr:1", "expect": [HR], "methods": ["GET"]}]}],
            )
        ],
        "outbound[0].routes[0].paths: required",
    ),
    (
        "http-proxy route without methods",
        [drop(f"{ROUTE}.methods")],
        "outbound[0].routes[0].methods: required",
    ),
    (
        "http outbound two routes",
        [put("outbound", [{**HTTP_OUT, "routes": HTTP_OUT["routes"] * 2}])],
        'outbound[0].routes: protocol = "http" takes exactly one route, got 2',
    ),
    # identity
    (
        "top-level spiffe_id invalid",
        [drop("identity"), put("spiffe_id", "spiffe://x/")],
        "spiffe_id: ",
    ),
    (
        "dev with a trust-domain id",
        [put("identity", {"spiffe_id": "spiffe://payroll.example"})],
        "identity.spiffe_id: 'spiffe://payroll.example' is a trust domain",
    ),
    (
        "dev with a bad id",
        [put("identity", {"spiffe_id": "spiffe://Payroll/x"})],
        "identity.spiffe_id: invalid SPIFFE ID",
    ),
    (
        "dev with cert",
        [put("identity", {"spiffe_id": PAYROLL, "cert": "svid.pem"})],
        'identity.cert: not valid with identity.source = "dev"',
    ),
    (
        "files with ttl",
        [put("identity.ttl", "1h")],
        'identity.ttl: not valid with identity.source = "files"',
    ),
    ("files missing bundle", [drop("identity.bundle")], "identity.bundle: required"),
    ("files empty cert", [put("identity.cert", "")], "identity.cert: must not be empty"),
    (
        "bad federation td",
        [put("identity.federation", {"Partner Example": "x.pem"})],
        'identity.federation."Partner Example": invalid trust domain',
    ),
    (
        "federation value not a path",
        [put("identity.federation", {"partner.example": 1})],
        'identity.federation."partner.example": expected a string, got an integer',
    ),
    (
        "unknown source",
        [put("identity.source", "vault")],
        'identity.source: expected one of "files", "workload-api", "dev", got \'vault\'',
    ),
    (
        "workload tcp hostname",
        [put("identity", {"source": "workload-api", "endpoint": "tcp://hostname:1"})],
        "identity.endpoint: invalid Workload API endpoint "
        "'tcp://hostname:1': the host must be an IP",
    ),
    (
        "workload unix relative",
        [put("identity", {"source": "workload-api", "endpoint": "unix:relative"})],
        "identity.endpoint: invalid Workload API endpoint "
        "'unix:relative': the socket path must be absolute",
    ),
    (
        "workload unix authority",
        [put("identity", {"source": "workload-api", "endpoint": "unix://host/x"})],
        "identity.endpoint: invalid Workload API endpoint "
        "'unix://host/x': a unix URI has no authority",
    ),
    (
        "workload http",
        [put("identity", {"source": "workload-api", "endpoint": "http://x"})],
        "identity.endpoint: invalid Workload API endpoint 'http://x': expected unix:///",
    ),
    (
        "workload tcp no port",
        [put("identity", {"source": "workload-api", "endpoint": "tcp://127.0.0.1"})],
        "identity.endpoint: invalid Workload API endpoint 'tcp://127.0.0.1': a port is required",
    ),
    (
        "workload with cert",
        [put("identity", {"source": "workload-api", "cert": "x"})],
        'identity.cert: not valid with identity.source = "workload-api"',
    ),
    # durations
    (
        "bad duration",
        [put(f"{IN}.handshake_timeout", "10 seconds")],
        "inbound[0].handshake_timeout: invalid duration '10 seconds'",
    ),
    (
        "negative duration",
        [put(f"{IN}.connect_timeout", -1)],
        "inbound[0].connect_timeout: expected a non-negative number of seconds, got -1",
    ),
    (
        "zero duration",
        [put(f"{IN}.request_timeout", "0s")],
        "inbound[0].request_timeout: must be greater than zero",
    ),
    (
        "nan duration",
        [put(f"{OUT}.idle_timeout", float("nan"))],
        "outbound[0].idle_timeout: expected a non-negative number of seconds, got nan",
    ),
    (
        "list duration",
        [put("drain_timeout", [1])],
        'drain_timeout: expected seconds or a duration such as "30s", got an array',
    ),
    (
        "dev ttl",
        [put("identity", {"spiffe_id": PAYROLL, "ttl": "forever"})],
        "identity.ttl: invalid duration",
    ),
    (
        "pool duration",
        [put(f"{OUT}.pool", {"idle_timeout": "soon"})],
        "outbound[0].pool.idle_timeout: invalid duration 'soon'",
    ),
    (
        "small header cap",
        [put(f"{IN}.max_header_bytes", 10)],
        "inbound[0].max_header_bytes: must be at least 1024, got 10",
    ),
]


@pytest.mark.parametrize(
    ("mutations", "expected"), [(m, e) for _, m, e in ERRORS], ids=[i for i, _, _ in ERRORS]
)
def test_errors_name_the_file_and_the_key_path(mutations: list[Mutation], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(*mutations)
    message = str(info.value)
    assert message.startswith("sidecar.toml: " + expected), message
    assert "\n" not in message
    assert isinstance(info.value, UsageError)


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text("[identity]\nsource = files\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ") and "line 2" in message
    assert "\n" not in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError, match=r"sidecar.toml: invalid TOML: not UTF-8"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: No such file or directory"


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: Is a directory"


def test_newlines_in_values_stay_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse(put(f"{IN}.name", "a\nb"))
    assert "\n" not in str(info.value)


def test_no_identity_section_means_dev_with_a_default_or_top_level_id() -> None:
    from proxy.config import DEV_TRUST_DOMAIN

    base = {
        "inbound": [
            {
                "name": "hr",
                "listen": "127.0.0.1:8443",
                "target": "127.0.0.1:8080",
                "protocol": "tcp",
                "rules": [{"peers": [PAYROLL]}],
            }
        ]
    }
    default = parse_config(base, "sidecar.toml", base_dir=Path("/etc/ap"))
    assert default.identity.source == "dev"
    assert default.identity.spiffe_id is not None
    assert str(default.identity.spiffe_id.trust_domain) == DEV_TRUST_DOMAIN
    assert default.identity.state_dir == Path("/etc/ap/.agent-proxy-dev")
    named = parse_config({**base, "spiffe_id": PAYROLL}, "sidecar.toml")
    assert named.identity.spiffe_id == SpiffeId.parse(PAYROLL)
    dev_table = parse_config({**base, "identity": {"source": "dev"}}, "sidecar.toml")
    assert dev_table.identity.spiffe_id == default.identity.spiffe_id
