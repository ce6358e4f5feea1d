"""How long one guard decision takes with 100 rules: ``python -m benchmarks.policy_bench``.

The budget is 20 microseconds per decision with 100 rules. The rule set is
a realistic mix for one busy inbound MCP/HTTP listener:

* 60 allow rules, one per agent, each for a method and a path subtree;
* 15 MCP tool rules (globs), 3 of them with a rate, 2 high-impact;
* 10 deny rules (peers, paths, tools), 1 with a CEL condition on arguments;
* 10 allow rules with CEL conditions (time, headers, SVID age, arguments);
* 5 dry-run rules.

Requests cycle through allowed reads, writes, tool calls, denied paths and
unknown peers; most reach no condition, a few do. Prints microseconds per
decision for the mix, and separately for a request that evaluates a
condition (CEL), and the worst of the individual request kinds.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

from proxy.identity import SpiffeId
from proxy.policy import SpiffePattern
from proxy.policy.conditions import compile_condition
from proxy.policy.evaluate import PolicySet
from proxy.policy.paths import PathPattern
from proxy.policy.ratelimit import Rate
from proxy.policy.rules import GuardRule, HighImpact, RequestFacts

TD = "payroll.example"
BUDGET_US = 20.0


def _peer(i: int) -> SpiffePattern:
    return SpiffePattern.parse(f"spiffe://{TD}/agent/a{i}")


def build_rules() -> list[GuardRule]:
    rules: list[GuardRule] = []
    for i in range(60):
        rules.append(
            GuardRule(
                name=f"agent-{i}",
                peers=(_peer(i),),
                methods=frozenset({"GET"} if i % 3 else {"GET", "POST"}),
                paths=(PathPattern.parse(f"/api/svc{i % 12}/**"),),
            )
        )
    for i in range(15):
        rules.append(
            GuardRule(
                name=f"tools-{i}",
                peers=(SpiffePattern.parse(f"spiffe://{TD}/agent/*"),),
                methods=frozenset({"POST"}),
                paths=(PathPattern.parse("/mcp"),),
                tools=(f"crm.{i}.*", f"search_{i}"),
                rate=Rate.parse("100/minute") if i < 3 else None,
                high_impact=HighImpact(300.0, ()) if i in (13, 14) else None,
            )
        )
    for i in range(10):
        rules.append(
            GuardRule(
                name=f"deny-{i}",
                peers=(_peer(50 + i),) if i < 5 else (),
                methods=frozenset({"*"}),
                paths=(PathPattern.parse(f"/admin/{i}/**"),) if i != 9 else (),
                tools=("transfer_*",) if i == 9 else (),
                when=compile_condition("mcp.args.amount > 10000") if i == 9 else None,
                action="deny",
            )
        )
    conditions = [
        "time.hour >= 8 && time.hour < 18",
        'request.headers["x-tenant"] == "acme"',
        "peer.svid_age_seconds < 600.0",
        'peer.trust_domain == "payroll.example" && request.method == "POST"',
        'mcp.tool.startsWith("report_")',
    ]
    for i in range(10):
        rules.append(
            GuardRule(
                name=f"cond-{i}",
                peers=(_peer(i * 5),),
                methods=frozenset({"POST"}),
                paths=(PathPattern.parse(f"/api/svc{i}/write/**"),),
                when=compile_condition(conditions[i % len(conditions)]),
            )
        )
    for i in range(5):
        rules.append(
            GuardRule(
                name=f"dry-{i}",
                peers=(_peer(i),),
                methods=frozenset({"DELETE", "PUT"}),
                paths=(PathPattern.parse("/api/**"),),
                mode="dry-run",
                action="deny",
            )
        )
    assert len(rules) == 100
    return rules


def build_requests(now: datetime) -> dict[str, list[RequestFacts]]:
    def peer(i: int) -> SpiffeId:
        return SpiffeId.parse(f"spiffe://{TD}/agent/a{i}")

    kinds: dict[str, list[RequestFacts]] = {
        "allowed read": [
            RequestFacts(peer(i), "GET", f"/api/svc{i % 12}/items/{i}", now, 30.0)
            for i in range(0, 60, 7)
        ],
        "allowed write": [
            RequestFacts(peer(i), "POST", f"/api/svc{i % 12}/items", now, 30.0)
            for i in range(0, 60, 3)
        ],
        "tool call": [
            RequestFacts(
                peer(i),
                "POST",
                "/mcp",
                now,
                30.0,
                mcp_method="tools/call",
                mcp_tool=f"search_{i % 15}",
                mcp_args={"q": "x"},
            )
            for i in range(10)
        ],
        "denied path": [
            RequestFacts(peer(50 + i), "GET", f"/admin/{i}/users", now, 30.0) for i in range(5)
        ],
        "unknown peer": [
            RequestFacts(SpiffeId.parse(f"spiffe://{TD}/agent/x{i}"), "GET", "/api/svc1/a", now)
            for i in range(5)
        ],
        "dry-run delete": [
            RequestFacts(peer(i), "DELETE", f"/api/svc{i}/items/1", now, 30.0) for i in range(5)
        ],
    }
    return kinds


def conditional_requests(now: datetime) -> list[RequestFacts]:
    """Requests that evaluate one CEL condition each (cond-* rules)."""
    return [
        RequestFacts(
            SpiffeId.parse(f"spiffe://{TD}/agent/a{i * 5}"),
            "POST",
            f"/api/svc{i}/write/x",
            now,
            30.0,
            headers={"x-tenant": "acme", "content-type": "application/json"},
        )
        for i in range(4)
    ]


def per_decision_us(policy: PolicySet, requests: list[RequestFacts], seconds: float) -> float:
    n = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    evaluate = policy.evaluate
    while True:
        for facts in requests:
            evaluate(facts)
        n += len(requests)
        if time.perf_counter() >= deadline:
            break
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args(argv)
    now = datetime(2026, 3, 4, 10, 30, tzinfo=UTC)
    policy = PolicySet(build_rules())
    kinds = build_requests(now)
    mix = [f for group in kinds.values() for f in group]
    for facts in mix:  # warm caches (path matcher) the way a running sidecar has
        policy.evaluate(facts)
    print(f"policy: {len(policy)} rules, version {policy.version[:23]}...")
    worst = 0.0
    for name, group in kinds.items():
        us = per_decision_us(policy, group, args.seconds / 2)
        worst = max(worst, us)
        print(f"  {name:<16} {us:6.2f} us/decision")
    mix_us = per_decision_us(policy, mix, args.seconds)
    cond_us = per_decision_us(policy, conditional_requests(now), args.seconds / 2)
    print(f"  {'with a condition':<16} {cond_us:6.2f} us/decision (one CEL evaluation)")
    print(f"mix: {mix_us:.2f} us/decision (budget {BUDGET_US:.0f} us; worst kind {worst:.2f})")
    return 0 if mix_us <= BUDGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
