"""Config for the guard: rule keys, agent protocols, [guard]; every error
names its key path."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from proxy.config import ConfigError, parse_config, summarize
from proxy.policy import SpiffePattern
from proxy.policy.quarantine import DenyBurst, GuardConfig, RateSpike
from proxy.policy.ratelimit import Rate
from proxy.policy.rules import HighImpact

PAYROLL = "spiffe://payroll.example/agent/payroll"
APPROVER = "spiffe://payroll.example/approver/*"

TOML = f"""
[identity]
source = "files"
cert = "svid.pem"
key = "svid_key.pem"
bundle = "bundle.pem"

[guard]
quarantine_for = "10m"
deny_burst = {{ count = 5, window = "1m" }}
rate_spike = {{ factor = 10, min_requests = 50, interval = "10s" }}
new_tool = true
learning_period = "1h"

[[inbound]]
name = "hr-api"
listen = "0.0.0.0:8443"
target = "127.0.0.1:8080"
protocol = "http"
[[inbound.rules]]
name = "reads"
peers = ["{PAYROLL}"]
methods = ["GET"]
paths = ["/timesheets/**"]
[[inbound.rules]]
name = "office-hours-writes"
peers = ["{PAYROLL}"]
methods = ["POST"]
paths = ["/timesheets/**"]
when = "time.hour >= 8 && time.hour < 18"
rate = "10/minute"
[[inbound.rules]]
name = "no-admin"
peers = ["spiffe://payroll.example/**"]
methods = ["*"]
paths = ["/admin/**"]
action = "deny"
[[inbound.rules]]
name = "try-deny-delete"
peers = ["spiffe://payroll.example/**"]
methods = ["DELETE"]
paths = ["/**"]
action = "deny"
mode = "dry-run"

[[inbound]]
name = "bank-mcp"
listen = "0.0.0.0:9443"
target = "127.0.0.1:9080"
protocol = "mcp"
max_body_bytes = 65536
[[inbound.rules]]
name = "bank-tools"
peers = ["{PAYROLL}"]
tools = ["bank.read_*", "bank.transfer"]
resources = ["file:///statements/*"]
prompts = ["summarise"]
log_args = ["amount", "payee"]
[[inbound.rules]]
name = "big-transfers"
peers = ["{PAYROLL}"]
tools = ["bank.transfer"]
when = "mcp.args.amount > 1000"
high_impact = {{ max_svid_age = "5m", approvers = ["{APPROVER}"] }}

[[inbound]]
name = "planner"
listen = "0.0.0.0:7443"
target = "127.0.0.1:7080"
protocol = "a2a"
[[inbound.rules]]
peers = ["{PAYROLL}"]
push_url_allowlist = ["https://hooks.payroll.example/*"]

[[outbound]]
name = "egress"
listen = "127.0.0.1:7071"
protocol = "http-proxy"
[[outbound.routes]]
name = "hr"
host = "hr-api"
target = "hr.payroll.svc:8443"
expect = ["spiffe://payroll.example/svc/hr"]
methods = ["GET"]
paths = ["/timesheets/**"]
[[outbound.routes]]
name = "tax-mcp"
host = "tax"
target = "tax.payroll.svc:8443"
expect = ["spiffe://payroll.example/svc/tax"]
protocol = "mcp"
tools = ["tax.file"]
rate = "5/hour"
"""


def doc() -> dict[str, Any]:
    return tomllib.loads(TOML)


def test_everything_parses() -> None:
    config = parse_config(doc(), "sidecar.toml")
    assert config.guard == GuardConfig(
        quarantine_for=600.0,
        deny_burst=DenyBurst(5, 60.0),
        rate_spike=RateSpike(factor=10.0, min_requests=50, interval=10.0),
        new_tool=True,
        learning_period=3600.0,
    )
    hr, bank, planner = config.inbound
    assert [r.name for r in hr.guard.rules] == [
        "reads",
        "office-hours-writes",
        "no-admin",
        "try-deny-delete",
    ]
    writes = hr.guard.rules[1]
    assert writes.when is not None and writes.rate == Rate(10, 60)
    assert hr.guard.rules[2].action == "deny" and hr.guard.rules[3].mode == "dry-run"
    assert bank.protocol == "mcp" and bank.max_body_bytes == 65536
    tools = bank.guard.rules[0]
    assert tools.tools == ("bank.read_*", "bank.transfer")
    assert tools.resources == ("file:///statements/*",) and tools.prompts == ("summarise",)
    assert tools.log_args == ("amount", "payee") and tools.methods == frozenset({"*"})
    assert bank.guard.rules[1].high_impact == HighImpact(300.0, (SpiffePattern.parse(APPROVER),))
    assert planner.guard.rules[0].push_url_allowlist == ("https://hooks.payroll.example/*",)
    hr_route, tax = config.outbound[0].routes
    assert hr_route.protocol == "http"
    assert hr_route.policy is not None and hr_route.guard_rule is not None
    assert tax.protocol == "mcp"
    assert tax.guard_rule is not None and tax.guard_rule.rate == Rate(5, 3600)
    assert config.policy_version.startswith("sha256:")


def test_policy_version_is_stable_and_follows_rules() -> None:
    a = parse_config(doc(), "a.toml").policy_version
    assert a == parse_config(doc(), "b.toml").policy_version
    changed = doc()
    changed["inbound"][0]["rules"][1]["rate"] = "11/minute"
    assert parse_config(changed, "a.toml").policy_version != a


def test_summary_mentions_the_guard() -> None:
    text = summarize(parse_config(doc(), "sidecar.toml"))
    for needle in [
        "guard: quarantine 10m on 5 denials in 1m",
        "policy version: sha256:",
        "- no-admin: deny; peers",
        "- try-deny-delete: deny (dry-run)",
        "when time.hour >= 8 && time.hour < 18",
        "rate 10/minute",
        "tools bank.read_*, bank.transfer",
        f"high impact: SVID younger than 5m and approval by {APPROVER}",
        "push URLs https://hooks.payroll.example/*",
        "inbound bank-mcp (mcp)",
        "mcp: methods *; paths any; tools tax.file; rate 5/hour",
    ]:
        assert needle in text, needle


def rule_at(d: dict[str, Any], listener: int, index: int) -> dict[str, Any]:
    rule: dict[str, Any] = d["inbound"][listener]["rules"][index]
    return rule


ERRORS: list[tuple[str, str, Any, str]] = [
    ("when", "0.1", "peer.idd == 'x'", "inbound[0].rules[1].when: unknown variable 'peer.idd'"),
    ("when", "0.1", "foo > 1", "inbound[0].rules[1].when: unknown variable 'foo'"),
    ("when", "0.1", "mcp.tool == 'x'", "inbound[0].rules[1].when: the variable 'mcp' is not"),
    ("when", "0.1", "time.hour >", "inbound[0].rules[1].when: invalid CEL"),
    ("rate", "0.1", "10/fortnight", "inbound[0].rules[1].rate: invalid rate '10/fortnight'"),
    ("rate", "0.2", "1/second", "inbound[0].rules[2].rate: only enforced allow rules"),
    ("action", "0.1", "block", 'inbound[0].rules[1].action: expected one of "allow", "deny"'),
    ("mode", "0.1", "audit", 'inbound[0].rules[1].mode: expected one of "enforce", "dry-run"'),
    ("tools", "0.1", ["x"], 'inbound[0].rules[1].tools: only valid for protocol = "mcp"'),
    (
        "push_url_allowlist",
        "1.0",
        ["https://x/"],
        'inbound[1].rules[0].push_url_allowlist: only valid for protocol = "a2a"',
    ),
    (
        "push_url_allowlist",
        "2.0",
        ["ftp://x/"],
        "inbound[2].rules[0].push_url_allowlist[0]: invalid URL pattern",
    ),
    # Entries the A2A matcher could never match: refused at load, not ignored.
    (
        "push_url_allowlist",
        "2.0",
        ["https://hooks.example/ok", "https://user@hooks.example/x"],
        "inbound[2].rules[0].push_url_allowlist[1]: invalid URL pattern",
    ),
    (
        "push_url_allowlist",
        "2.0",
        ["https://hooks.example/x?token=1"],
        "inbound[2].rules[0].push_url_allowlist[0]: invalid URL pattern",
    ),
    (
        "push_url_allowlist",
        "2.0",
        ["https://hooks.*.example/x"],
        "inbound[2].rules[0].push_url_allowlist[0]: invalid URL pattern",
    ),
    ("high_impact", "1.1", {}, "inbound[1].rules[1].high_impact: needs max_svid_age"),
    (
        "high_impact",
        "1.1",
        {"approvers": ["spiffe://x/a*"]},
        "inbound[1].rules[1].high_impact.approvers[0]: invalid SPIFFE ID pattern",
    ),
    (
        "high_impact",
        "1.1",
        {"max_svid_age": "soon"},
        "inbound[1].rules[1].high_impact.max_svid_age: invalid duration",
    ),
    (
        "high_impact",
        "1.1",
        {"max_svid_age": "5m", "approver": []},
        "unknown key 'inbound[1].rules[1].high_impact.approver'",
    ),
    ("tools", "1.0", [""], "inbound[1].rules[0].tools[0]: invalid name or pattern"),
]


@pytest.mark.parametrize(("key", "where", "value", "expected"), ERRORS)
def test_rule_errors_name_the_key_path(key: str, where: str, value: Any, expected: str) -> None:
    d = doc()
    listener, index = (int(x) for x in where.split("."))
    rule_at(d, listener, index)[key] = value
    with pytest.raises(ConfigError) as info:
        parse_config(d, "sidecar.toml")
    assert str(info.value).startswith("sidecar.toml: " + expected), str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("guard", "deny_burst"), {"count": 0}, "guard.deny_burst.count: must be at least 1"),
        (("guard", "rate_spike"), {"factor": "x"}, "guard.rate_spike.factor: expected a number"),
        (("guard", "quarantine"), "1m", "unknown key 'guard.quarantine'"),
        (("guard", "learning_period"), "forever", "guard.learning_period: invalid duration"),
        (("inbound", 0, "protocol"), "grpc", 'inbound[0].protocol: expected one of "tcp"'),
        (("inbound", 0, "max_body_bytes"), 10, "inbound[0].max_body_bytes: must be at least 1024"),
        (
            ("outbound", 0, "routes", 1, "protocol"),
            "smtp",
            'outbound[0].routes[1].protocol: expected one of "http", "mcp", "a2a"',
        ),
        (
            ("outbound", 0, "routes", 1, "when"),
            "peer.id == 'x'",
            "outbound[0].routes[1].when: the variable 'peer' is not available here",
        ),
        (
            ("outbound", 0, "routes", 0, "tools"),
            ["x"],
            'outbound[0].routes[0].tools: only valid for protocol = "mcp"',
        ),
    ],
)
def test_other_errors_name_the_key_path(path: tuple[Any, ...], value: Any, expected: str) -> None:
    d = doc()
    node: Any = d
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        parse_config(d, "sidecar.toml")
    assert str(info.value).startswith("sidecar.toml: " + expected), str(info.value)


def test_tcp_listeners_take_no_guard_keys() -> None:
    d = doc()
    d["inbound"].append(
        {
            "name": "l4",
            "listen": "0.0.0.0:6443",
            "target": "127.0.0.1:6080",
            "protocol": "tcp",
            "rules": [{"peers": [PAYROLL], "when": "true"}],
        }
    )
    with pytest.raises(ConfigError, match=r"inbound\[3\]\.rules\[0\]\.when: only valid for HTTP"):
        parse_config(d, "sidecar.toml")


def test_http_rules_still_need_methods_and_paths_but_mcp_rules_do_not() -> None:
    d = doc()
    del rule_at(d, 0, 0)["paths"]
    with pytest.raises(ConfigError, match=r"inbound\[0\]\.rules\[0\]\.paths: required"):
        parse_config(d, "sidecar.toml")
    d = doc()
    rule_at(d, 1, 0)["paths"] = ["/mcp"]
    config = parse_config(d, "sidecar.toml")
    assert [p.text for p in config.inbound[1].guard.rules[0].paths] == ["/mcp"]
