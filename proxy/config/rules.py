"""Rules: the keys of an ``[[inbound.rules]]`` or ``[[outbound.routes]]``
table that say who may do what (methods, paths, conditions, rates,
high-impact steps, MCP and A2A selectors)."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.config.walker import Table
from proxy.policy import PatternError, SpiffePattern
from proxy.policy.conditions import ConditionError, compile_condition
from proxy.policy.paths import PathPattern, PathPatternError, parse_method
from proxy.policy.ratelimit import Rate, RateError
from proxy.policy.rules import GuardRule, HighImpact


def http_only(protocol: str, keys: Sequence[str]) -> dict[str, str]:
    return {k: f'only valid for HTTP listeners, not protocol = "{protocol}"' for k in keys}


def methods_of(t: Table) -> frozenset[str]:
    methods = t.parsed_list("methods", parse_method, (PathPatternError,))
    for i, method in enumerate(methods):
        if method != method.upper():
            t.ctx.fail(
                f"{t.at('methods')}[{i}]",
                f"HTTP methods are case-sensitive: write {method.upper()!r}, not {method!r}",
            )
    return frozenset(methods)


def paths_of(t: Table) -> tuple[PathPattern, ...]:
    return t.parsed_list("paths", PathPattern.parse, (PathPatternError,))


def patterns(t: Table, key: str) -> tuple[SpiffePattern, ...]:
    return t.parsed_list(key, SpiffePattern.parse, (PatternError,))


GUARD_KEYS = (
    "when",
    "action",
    "mode",
    "rate",
    "high_impact",
    "tools",
    "resources",
    "prompts",
    "log_args",
    "push_url_allowlist",
    "max_body_bytes",
)
_MCP_ONLY = ("tools", "resources", "prompts", "log_args")
_A2A_ONLY = ("push_url_allowlist", "a2a_methods")


def _only_for(protocol: str, keys: Sequence[str], needed: str) -> dict[str, str]:
    return {k: f'only valid for protocol = "{needed}", not protocol = "{protocol}"' for k in keys}


def _globs(t: Table, key: str) -> tuple[str, ...]:
    values = t.strings(key, required=False)
    for i, value in enumerate(values):
        if not value.strip() or any(c in value for c in "\r\n\x00"):
            t.ctx.fail(f"{t.at(key)}[{i}]", f"invalid name or pattern {value!r}")
    return tuple(values)


def _rate(t: Table) -> Rate | None:
    text = t.string("rate", default=None)
    if text is None:
        return None
    try:
        return Rate.parse(text)
    except RateError as exc:
        t.fail("rate", str(exc))


def _high_impact(t: Table) -> HighImpact | None:
    ht = t.table("high_impact")
    if ht is None:
        return None
    age = ht.duration("max_svid_age", default=None)
    approvers: tuple[SpiffePattern, ...] = ()
    if ht.has("approvers"):
        approvers = patterns(ht, "approvers")
    ht.done()
    if age is None and not approvers:
        t.fail(
            "high_impact",
            "needs max_svid_age (a fresh SVID), approvers (an approval token), or both",
        )
    return HighImpact(max_svid_age=age, approvers=approvers)


def _push_urls(t: Table) -> tuple[str, ...]:
    values = t.strings("push_url_allowlist", required=False, nonempty=False)
    if values:  # here, not at the top: only an A2A config loads the A2A code
        from proxy.agent.a2a_push import validate_push_allowlist_entry
    for i, value in enumerate(values):
        # The matcher's own parser: an entry it cannot read would never match.
        try:
            validate_push_allowlist_entry(value)
        except ValueError:
            t.ctx.fail(
                f"{t.at('push_url_allowlist')}[{i}]",
                f"invalid URL pattern {value!r}: expected http(s)://host[:port][/path] ('*' "
                "as a leading '*.' label or in path segments; no userinfo, query or fragment)",
            )
    return tuple(values)


def guard_rule(
    rt: Table,
    name: str,
    protocol: str,
    peers: tuple[SpiffePattern, ...],
    roots: frozenset[str],
) -> GuardRule:
    """The guard keys of an [[inbound.rules]] or [[outbound.routes]] table."""
    if protocol == "http":
        methods, paths = methods_of(rt), paths_of(rt)
    else:  # mcp, a2a: one endpoint; any method and path unless narrowed
        methods = methods_of(rt) if rt.has("methods") else frozenset({"*"})
        paths = paths_of(rt) if rt.has("paths") else ()
    action = rt.choice("action", ("allow", "deny"), default="allow")
    mode = rt.choice("mode", ("enforce", "dry-run"), default="enforce")
    when = None
    text = rt.string("when", default=None)
    if protocol == "a2a" and rt.has("a2a_methods"):
        # Method allowlists name v0.3 or v1.0 methods; both normalise to the
        # v1.0 name the relay puts in mcp.method, so one list covers both.
        from proxy.agent.a2a import normalize_method as normalize_a2a_method

        names = []
        for i, name in enumerate(rt.strings("a2a_methods")):
            normal = normalize_a2a_method(name)
            if normal is None:
                rt.ctx.fail(f"{rt.at('a2a_methods')}[{i}]", f"unknown A2A method {name!r}")
            names.append(normal[0])
        listed = "mcp.method in [" + ", ".join(repr(n) for n in sorted(set(names))) + "]"
        text = listed if text is None else f"({text}) && {listed}"
    if text is not None:
        try:
            when = compile_condition(text, roots)
        except ConditionError as exc:
            rt.fail("when", str(exc))
    rate, high_impact = _rate(rt), _high_impact(rt)
    for key, value in (("rate", rate), ("high_impact", high_impact)):
        if value is not None and (action != "allow" or mode != "enforce"):
            rt.fail(key, 'only enforced allow rules take it (action = "allow", mode = "enforce")')
    empty: tuple[str, ...] = ()
    tools = resources = prompts = log_args = push = empty
    if protocol == "mcp":
        tools, resources = _globs(rt, "tools"), _globs(rt, "resources")
        prompts = _globs(rt, "prompts")
        log_args = tuple(rt.strings("log_args", required=False, nonempty=False))
    if protocol == "a2a":
        push = _push_urls(rt)
    return GuardRule(
        name=name,
        peers=peers,
        methods=methods,
        paths=paths,
        tools=tools,
        resources=resources,
        prompts=prompts,
        when=when,
        action=action,
        mode=mode,
        rate=rate,
        high_impact=high_impact,
        allow_upgrade=rt.boolean("allow_upgrade"),
        log_args=log_args,
        push_url_allowlist=push,
    )


def guard_elsewhere(protocol: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if protocol != "mcp":
        out.update(_only_for(protocol, _MCP_ONLY, "mcp"))
    if protocol != "a2a":
        out.update(_only_for(protocol, _A2A_ONLY, "a2a"))
    return out
