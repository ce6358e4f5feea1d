"""The human-readable account of a config that ``check-config`` prints."""

from __future__ import annotations

from datetime import timedelta

from proxy.config.schema import HTTP_FAMILY, XFCC, Config
from proxy.durations import format_duration
from proxy.policy.quarantine import GuardConfig
from proxy.policy.rules import GuardRule


def _seconds(value: float) -> str:
    return format_duration(timedelta(seconds=value))


def _rule_lines(rule: GuardRule, protocol: str, head: str) -> list[str]:
    parts = [head]
    if isinstance(rule, GuardRule) and (rule.action != "allow" or rule.mode != "enforce"):
        parts.append(rule.action + (" (dry-run)" if rule.mode == "dry-run" else ""))
    if rule.peers:
        parts.append("peers " + ", ".join(p.text for p in rule.peers))
    if protocol != "tcp":
        parts.append("methods " + ",".join(sorted(rule.methods)))
        parts.append("paths " + (", ".join(p.text for p in rule.paths) or "any"))
        if rule.allow_upgrade:
            parts.append("upgrade allowed")
    if isinstance(rule, GuardRule):
        for key, values in (
            ("tools", rule.tools),
            ("resources", rule.resources),
            ("prompts", rule.prompts),
            ("logs args", rule.log_args),
            ("push URLs", rule.push_url_allowlist),
        ):
            if values:
                parts.append(f"{key} " + ", ".join(values))
        if rule.when is not None:
            parts.append(f"when {rule.when.text}")
        if rule.rate is not None:
            parts.append(f"rate {rule.rate}")
        hi = rule.high_impact
        if hi is not None:
            need = []
            if hi.max_svid_age is not None:
                need.append(f"SVID younger than {_seconds(hi.max_svid_age)}")
            if hi.approvers:
                need.append("approval by " + ", ".join(p.text for p in hi.approvers))
            parts.append("high impact: " + " and ".join(need))
    return [parts[0] + " " + "; ".join(parts[1:])]


def _guard_summary(guard: GuardConfig) -> str:
    trips = []
    if guard.deny_burst is not None:
        b = guard.deny_burst
        trips.append(f"{b.count} denials in {_seconds(b.window)}")
    if guard.rate_spike is not None:
        r = guard.rate_spike
        trips.append(
            f"rate over {r.factor:g}x baseline (min {r.min_requests} per {_seconds(r.interval)})"
        )
    if guard.new_tool:
        trips.append("new tool")
    if guard.new_path:
        trips.append("new path")
    if not trips:
        return "guard: no tripwire"
    return (
        f"guard: quarantine {_seconds(guard.quarantine_for)} on "
        + ", ".join(trips)
        + f" (learning period {_seconds(guard.learning_period)})"
    )


def summarize(config: Config) -> str:
    """A human-readable account of a config, for ``agent-proxy check-config``."""
    ident = config.identity
    lines = [f"config {config.source}: OK", f"identity: source {ident.source}"]
    if ident.source == "files":
        lines += [f"  cert {ident.cert}", f"  key {ident.key}", f"  bundle {ident.bundle}"]
        lines += [
            f"  federation {td} {path}"
            for td, path in sorted(ident.federation.items(), key=lambda kv: kv[0].name)
        ]
    elif ident.source == "workload-api":
        lines.append(f"  endpoint {ident.endpoint or '$SPIFFE_ENDPOINT_SOCKET'}")
    else:
        lines += [
            f"  spiffe_id {ident.spiffe_id}",
            f"  state_dir {ident.state_dir}",
            f"  ttl {format_duration(ident.ttl)}",
        ]
    admin = config.admin.listen
    lines.append(f"admin: {'http://' + str(admin) if admin else 'disabled'}")
    lines.append(f"audit: {'stdout' if config.audit.path == '-' else config.audit.path}")
    lines.append(f"log level: {config.log_level}; drain timeout {_seconds(config.drain_timeout)}")
    lines.append(_guard_summary(config.guard))
    lines.append(f"policy version: {config.policy_version}")
    for inb in config.inbound:
        lines.append(
            f"inbound {inb.name} ({inb.protocol}): {inb.listen} -> {inb.target}"
            f" [min TLS {inb.min_tls}, max {inb.max_connections} connections]"
        )
        if inb.protocol in HTTP_FAMILY and inb.identity_headers != (XFCC,):
            lines.append(f"  strips identity headers {', '.join(inb.identity_headers)}")
        if inb.protocol in ("mcp", "a2a"):
            lines.append(f"  max body {inb.max_body_bytes} bytes")
        count = len(inb.guard)
        lines.append(f"  {count} rule{'s' if count != 1 else ''}:")
        for grule in inb.guard.rules:
            lines += _rule_lines(grule, inb.protocol, f"    - {grule.name}:")
    for out in config.outbound:
        lines.append(
            f"outbound {out.name} ({out.protocol}): {out.listen}"
            f" [min TLS {out.min_tls}, max {out.max_connections} connections]"
        )
        lines.append(f"  {len(out.routes)} route{'s' if len(out.routes) != 1 else ''}:")
        for route in out.routes:
            head = f"{route.host} -> " if route.host else "-> "
            lines.append(
                f"    - {route.name}: {head}{route.target} expecting "
                + ", ".join(p.text for p in route.expect)
            )
            if route.guard_rule is not None:
                verb = "      allows" if route.protocol == "http" else f"      {route.protocol}:"
                lines += _rule_lines(route.guard_rule, out.protocol, verb)
    return "\n".join(lines)
