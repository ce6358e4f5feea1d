"""The guard policy as a table: deny overrides allow, fail closed, dry-run,
MCP scopes, list visibility, load errors and the policy version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from proxy.identity import SpiffeId
from proxy.policy import SpiffePattern
from proxy.policy.conditions import ConditionError, compile_condition
from proxy.policy.evaluate import PolicySet
from proxy.policy.paths import PathPattern
from proxy.policy.ratelimit import Rate
from proxy.policy.rules import GuardRule, HighImpact, RequestFacts

NOW = datetime(2026, 3, 4, 10, 30, tzinfo=UTC)  # a Wednesday
PAYROLL = "spiffe://payroll.example/agent/payroll"
MARKETING = "spiffe://payroll.example/agent/marketing"


def rule(name: str, **kw: Any) -> GuardRule:
    kw.setdefault("peers", (SpiffePattern.parse("spiffe://payroll.example/agent/*"),))
    kw.setdefault("methods", frozenset({"*"}))
    kw.setdefault("paths", (PathPattern.parse("/**"),))
    if isinstance(kw.get("when"), str):
        kw["when"] = compile_condition(kw["when"])
    return GuardRule(name, **kw)


def facts(
    peer: str | None = PAYROLL, method: str = "GET", path: str = "/x", **kw: Any
) -> RequestFacts:
    return RequestFacts(
        peer=SpiffeId.parse(peer) if peer else None, method=method, path=path, now=NOW, **kw
    )


def tool_call(tool: str, args: dict[str, Any] | None = None, **kw: Any) -> RequestFacts:
    return facts(
        method="POST",
        path="/mcp",
        mcp_method="tools/call",
        mcp_tool=tool,
        mcp_args=args or {},
        **kw,
    )


CASES: list[tuple[str, list[GuardRule], RequestFacts, bool, str, str | None]] = [
    ("allow", [rule("r")], facts(), True, "rule_matched", "r"),
    ("no rule", [], facts(), False, "no_matching_rule", None),
    (
        "other peer",
        [rule("r", peers=(SpiffePattern.parse(PAYROLL),))],
        facts(MARKETING),
        False,
        "no_matching_rule",
        None,
    ),
    ("no peer", [rule("r")], facts(None), False, "no_matching_rule", None),
    ("any peer", [rule("r", peers=())], facts(None), True, "rule_matched", "r"),
    ("method", [rule("r", methods=frozenset({"POST"}))], facts(), False, "no_matching_rule", None),
    (
        "path",
        [rule("r", paths=(PathPattern.parse("/api/**"),))],
        facts(path="/apix"),
        False,
        "no_matching_rule",
        None,
    ),
    (
        "deny overrides allow",
        [rule("a"), rule("d", action="deny")],
        facts(),
        False,
        "denied_by_rule",
        "d",
    ),
    (
        "deny overrides a later allow",
        [rule("d", action="deny"), rule("a")],
        facts(),
        False,
        "denied_by_rule",
        "d",
    ),
    (
        "deny elsewhere",
        [rule("a"), rule("d", action="deny", paths=(PathPattern.parse("/admin/**"),))],
        facts(),
        True,
        "rule_matched",
        "a",
    ),
    (
        "condition true",
        [rule("r", when='request.method == "GET"')],
        facts(),
        True,
        "rule_matched",
        "r",
    ),
    (
        "condition false",
        [rule("r", when='request.method == "POST"')],
        facts(),
        False,
        "no_matching_rule",
        None,
    ),
    (
        "evaluation error denies though another rule allows",
        [rule("ok"), rule("broken", when="mcp.args.amount > 10")],
        facts(),
        False,
        "policy_error",
        "broken",
    ),
    (
        "non-boolean result denies",
        [rule("ok"), rule("num", when="time.hour + 1")],
        facts(),
        False,
        "policy_error",
        "num",
    ),
    (
        "absent fact denies",
        [rule("age", when="peer.svid_age_seconds < 60.0")],
        facts(),
        False,
        "policy_error",
        "age",
    ),
    (
        "fact present",
        [rule("age", when="peer.svid_age_seconds < 60.0")],
        facts(svid_age_seconds=12.0),
        True,
        "rule_matched",
        "age",
    ),
    (
        "conditional deny",
        [rule("a"), rule("d", action="deny", when="time.hour >= 10")],
        facts(),
        False,
        "denied_by_rule",
        "d",
    ),
    (
        "time and weekday",
        [rule("r", when="time.hour == 10 && time.weekday == 3")],
        facts(),
        True,
        "rule_matched",
        "r",
    ),
    (
        "headers",
        [rule("r", when='request.headers["x-tenant"] == "acme"')],
        facts(headers={"x-tenant": "acme"}),
        True,
        "rule_matched",
        "r",
    ),
    (
        "trust domain",
        [rule("r", when='peer.trust_domain == "payroll.example"')],
        facts(),
        True,
        "rule_matched",
        "r",
    ),
    ("upgrade refused", [rule("r")], facts(upgrade=True), False, "upgrade_not_allowed", None),
    (
        "upgrade allowed",
        [rule("r", allow_upgrade=True)],
        facts(upgrade=True),
        True,
        "rule_matched",
        "r",
    ),
    # MCP scopes
    ("tool glob", [rule("t", tools=("crm.*",))], tool_call("crm.read"), True, "rule_matched", "t"),
    (
        "tool glob miss",
        [rule("t", tools=("crm.*",))],
        tool_call("bank.pay"),
        False,
        "no_matching_rule",
        None,
    ),
    (
        "unscoped allow grants no tool",
        [rule("any")],
        tool_call("crm.read"),
        False,
        "no_matching_rule",
        None,
    ),
    (
        "unscoped deny denies tools",
        [rule("t", tools=("*",)), rule("d", action="deny")],
        tool_call("crm.read"),
        False,
        "denied_by_rule",
        "d",
    ),
    (
        "tool deny overrides",
        [rule("t", tools=("*",)), rule("d", action="deny", tools=("bank.*",))],
        tool_call("bank.pay"),
        False,
        "denied_by_rule",
        "d",
    ),
    (
        "argument condition",
        [rule("t", tools=("pay",), when="mcp.args.amount <= 100")],
        tool_call("pay", {"amount": 50}),
        True,
        "rule_matched",
        "t",
    ),
    (
        "argument condition false",
        [rule("t", tools=("pay",), when="mcp.args.amount <= 100")],
        tool_call("pay", {"amount": 500}),
        False,
        "no_matching_rule",
        None,
    ),
    (
        "missing argument fails closed",
        [rule("t", tools=("pay",), when="mcp.args.amount <= 100")],
        tool_call("pay", {}),
        False,
        "policy_error",
        "t",
    ),
    (
        "tool rule admits the session",
        [rule("t", tools=("crm.*",), when="mcp.args.x == 1")],
        facts(method="POST", path="/mcp", mcp_method="initialize"),
        True,
        "rule_matched",
        "t",
    ),
    (
        "tool rule admits tools/list",
        [rule("t", tools=("crm.*",))],
        facts(method="POST", path="/mcp", mcp_method="tools/list"),
        True,
        "rule_matched",
        "t",
    ),
    (
        "scoped deny ignores the session",
        [rule("t", tools=("*",)), rule("d", action="deny", tools=("x",), when="mcp.args.a == 1")],
        facts(method="POST", path="/mcp", mcp_method="initialize"),
        True,
        "rule_matched",
        "t",
    ),
    (
        "tool rule grants no other method",
        [rule("t", tools=("*",))],
        facts(method="POST", path="/mcp", mcp_method="resources/subscribe"),
        False,
        "no_matching_rule",
        None,
    ),
    (
        "resources",
        [rule("r", resources=("file:///reports/*",))],
        facts(
            method="POST",
            path="/mcp",
            mcp_method="resources/read",
            resource_uri="file:///reports/q1",
        ),
        True,
        "rule_matched",
        "r",
    ),
    (
        "prompts",
        [rule("p", prompts=("summarise",))],
        facts(method="POST", path="/mcp", mcp_method="prompts/get", prompt_name="other"),
        False,
        "no_matching_rule",
        None,
    ),
]


@pytest.mark.parametrize(
    ("rules", "request_facts", "allowed", "reason", "rule_name"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decision_table(
    rules: list[GuardRule],
    request_facts: RequestFacts,
    allowed: bool,
    reason: str,
    rule_name: str | None,
) -> None:
    policy = PolicySet(rules)
    decision = policy.evaluate(request_facts)
    assert (decision.allowed, decision.reason, decision.rule) == (allowed, reason, rule_name)
    assert decision.policy_version == policy.version
    if reason == "policy_error":
        assert decision.error and rule_name and decision.error.startswith(rule_name)


def test_dry_run_never_changes_the_outcome() -> None:
    base = [rule("a", paths=(PathPattern.parse("/api/**"),))]
    dry = [
        rule("new-deny", action="deny", mode="dry-run"),
        rule("new-allow", mode="dry-run", paths=(PathPattern.parse("/other/**"),)),
        rule("broken", mode="dry-run", when="mcp.args.x == 1"),
    ]
    for path in ("/api/x", "/other/y", "/nowhere"):
        plain = PolicySet(base).evaluate(facts(path=path))
        with_dry = PolicySet(base + dry).evaluate(facts(path=path))
        assert (with_dry.allowed, with_dry.reason, with_dry.rule) == (
            plain.allowed,
            plain.reason,
            plain.rule,
        )
    d = PolicySet(base + dry).evaluate(facts(path="/api/x"))
    assert d.allowed and ("new-deny", "would_deny") in d.dry_run
    assert ("broken", "would_deny") in d.dry_run and d.error and "broken" in d.error
    d = PolicySet(base + dry).evaluate(facts(path="/other/y"))
    assert not d.allowed and ("new-allow", "would_allow") in d.dry_run


def test_every_matching_allow_rule_brings_its_rate_and_step_up() -> None:
    step = HighImpact(max_svid_age=300.0)
    policy = PolicySet(
        [
            rule("broad", tools=("*",), rate=Rate.parse("100/minute")),
            rule("pay", tools=("bank.pay",), high_impact=step, rate=Rate.parse("5/minute")),
        ]
    )
    d = policy.evaluate(tool_call("bank.pay"))
    assert d.allowed and d.rule == "broad"
    assert d.rates == (("broad", Rate(100, 60)), ("pay", Rate(5, 60)))
    assert d.high_impact == (("pay", step),)
    assert policy.evaluate(tool_call("crm.read")).high_impact == ()


def test_unknown_variable_is_a_load_error() -> None:
    for text in ("peer.idd == 'x'", "foo", "request.header['a'] == 'b'", "peer.id.x == 1"):
        with pytest.raises(ConditionError, match="unknown variable"):
            compile_condition(text)
    with pytest.raises(ConditionError, match="not available here"):
        compile_condition("mcp.tool == 'x'", roots={"peer", "request", "time"})
    with pytest.raises(ConditionError, match="invalid CEL"):
        compile_condition("peer.id ==")
    with pytest.raises(ConditionError, match="shadows"):
        compile_condition("mcp.args.exists(peer, true)")
    # Comprehension variables, open maps and methods are fine.
    compile_condition('mcp.args.exists(k, k == "amount") && mcp.args.amount > 1')
    compile_condition('request.headers.foo == "1" && peer.id.startsWith("spiffe://a/")')


def test_visibility_for_list_filtering() -> None:
    policy = PolicySet(
        [
            rule("read", tools=("crm.*",)),
            rule("pay", tools=("bank.pay",), when="mcp.args.amount < 100"),
            rule("office", tools=("report",), when="time.hour >= 20"),
            rule("no-delete", action="deny", tools=("crm.delete",)),
            rule("big", action="deny", tools=("crm.export",), when="mcp.args.rows > 10"),
        ]
    )
    listing = facts(method="POST", path="/mcp", mcp_method="tools/list")
    names = ["crm.read", "crm.delete", "crm.export", "bank.pay", "report", "other"]
    assert policy.visible_names(listing, "tool", names) == ["crm.read", "crm.export", "bank.pay"]
    assert (
        policy.visible_names(
            facts(
                MARKETING.replace("agent", "svc"),
                method="POST",
                path="/mcp",
                mcp_method="tools/list",
            ),
            "tool",
            names,
        )
        == []
    )


def test_policy_version_is_stable_and_changes_with_any_rule() -> None:
    def build(**kw: Any) -> PolicySet:
        return PolicySet([rule("a", **kw), rule("d", action="deny")])

    assert build().version == build().version
    assert build().version.startswith("sha256:") and len(build().version) == 71
    variants = [
        build(when="time.hour > 1"),
        build(tools=("x",)),
        build(rate=Rate.parse("1/second")),
        build(mode="dry-run"),
        build(methods=frozenset({"GET"})),
        build(high_impact=HighImpact(60.0)),
        PolicySet([rule("d", action="deny"), rule("a")]),  # order matters
    ]
    versions = {v.version for v in variants} | {build().version}
    assert len(versions) == len(variants) + 1


def test_admitted_peers_are_those_of_enforced_allow_rules() -> None:
    p = SpiffePattern.parse(PAYROLL)
    m = SpiffePattern.parse(MARKETING)
    policy = PolicySet(
        [
            rule("a", peers=(p,)),
            rule("d", peers=(m,), action="deny"),
            rule("dry", peers=(m,), mode="dry-run"),
        ]
    )
    assert policy.admitted_peers() == (p,)
