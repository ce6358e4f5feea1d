"""Guard rules and the facts a request decision reads (pure).

A :class:`GuardRule` is one ``[[...rules]]`` entry; how rules match and
combine is :mod:`proxy.policy.evaluate`'s. :class:`RequestFacts` is
everything a decision may depend on, time included (passed in, never read
here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from proxy.identity import SpiffeId
from proxy.policy.conditions import Activation, Condition, Needs
from proxy.policy.paths import PathPattern
from proxy.policy.peers import SpiffePattern
from proxy.policy.ratelimit import Rate

__all__ = [
    "MCP_SCOPED_METHODS",
    "MCP_SESSION_METHODS",
    "GuardRule",
    "HighImpact",
    "RequestFacts",
]

Action = Literal["allow", "deny"]
Mode = Literal["enforce", "dry-run"]
Kind = Literal["tool", "resource", "prompt"]

TOOLS_CALL = "tools/call"
RESOURCES_READ = "resources/read"
PROMPTS_GET = "prompts/get"
MCP_SCOPED_METHODS = frozenset({TOOLS_CALL, RESOURCES_READ, PROMPTS_GET})
# What a client needs around the calls a scoped rule grants.
MCP_SESSION_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",  # 2026-07-28: what the server offers, before any call
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
    }
)
_KIND_METHOD: Mapping[str, str] = {
    "tool": TOOLS_CALL,
    "resource": RESOURCES_READ,
    "prompt": PROMPTS_GET,
}

RULE_MATCHED = "rule_matched"
DENIED_BY_RULE = "denied_by_rule"
NO_MATCHING_RULE = "no_matching_rule"
POLICY_ERROR = "policy_error"
UPGRADE_NOT_ALLOWED = "upgrade_not_allowed"
WOULD_ALLOW = "would_allow"
WOULD_DENY = "would_deny"
_PEER_CACHE_SIZE = 4096
# Classes of request, for the index: plain HTTP or MCP session traffic, another
# MCP method, and the three scoped calls.
_PLAIN, _OTHER, _TOOL, _RESOURCE, _PROMPT = 0, 1, 2, 3, 4
_SCOPED_CLASS = {TOOLS_CALL: _TOOL, RESOURCES_READ: _RESOURCE, PROMPTS_GET: _PROMPT}


@dataclass(frozen=True, slots=True)
class HighImpact:
    """Step-up for a high-impact action: a fresh SVID, an approval token, or both."""

    max_svid_age: float | None = None  # seconds
    approvers: tuple[SpiffePattern, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "max_svid_age": self.max_svid_age,
            "approvers": [p.text for p in self.approvers],
        }


@dataclass(frozen=True, slots=True)
class GuardRule:
    name: str
    peers: tuple[SpiffePattern, ...] = ()
    methods: frozenset[str] = frozenset({"*"})
    paths: tuple[PathPattern, ...] = ()
    tools: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    when: Condition | None = None
    action: Action = "allow"
    mode: Mode = "enforce"
    rate: Rate | None = None
    high_impact: HighImpact | None = None
    allow_upgrade: bool = False
    log_args: tuple[str, ...] = ()
    push_url_allowlist: tuple[str, ...] = ()

    @property
    def scoped(self) -> bool:
        return bool(self.tools or self.resources or self.prompts)

    def describe(self) -> dict[str, Any]:
        """A canonical, JSON-ready description (the policy version hashes it)."""
        return {
            "name": self.name,
            "peers": [p.text for p in self.peers],
            "methods": sorted(self.methods),
            "paths": [p.text for p in self.paths],
            "tools": list(self.tools),
            "resources": list(self.resources),
            "prompts": list(self.prompts),
            "when": self.when.text if self.when is not None else None,
            "action": self.action,
            "mode": self.mode,
            "rate": [self.rate.count, self.rate.period] if self.rate else None,
            "high_impact": self.high_impact.describe() if self.high_impact else None,
            "allow_upgrade": self.allow_upgrade,
            "log_args": list(self.log_args),
            "push_url_allowlist": list(self.push_url_allowlist),
        }


def _target(facts: RequestFacts, cls: int) -> str | None:
    if cls == _TOOL:
        return facts.mcp_tool
    if cls == _RESOURCE:
        return facts.resource_uri
    if cls == _PROMPT:
        return facts.prompt_name
    return None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a decision may depend on. ``headers``: lowercased names.
    ``now``: wall-clock time (timezone-aware) for ``time.*``."""

    peer: SpiffeId | None
    method: str
    path: str  # normalised (proxy.policy.paths.normalize_path)
    now: datetime
    svid_age_seconds: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    mcp_method: str | None = None
    mcp_tool: str | None = None
    mcp_args: Mapping[str, Any] | None = None
    resource_uri: str | None = None
    prompt_name: str | None = None
    upgrade: bool = False


def _activation(facts: RequestFacts, needs: Needs) -> Activation:
    def peer() -> Mapping[str, Any]:
        # Absent facts are absent keys: a condition reading one fails (and denies).
        out: dict[str, Any] = {}
        if facts.peer is not None:
            out["id"] = str(facts.peer)
            out["trust_domain"] = facts.peer.trust_domain.name
        if facts.svid_age_seconds is not None:
            out["svid_age_seconds"] = float(facts.svid_age_seconds)
        return out

    def request() -> Mapping[str, Any]:
        return {"method": facts.method, "path": facts.path, "headers": dict(facts.headers)}

    def mcp() -> Mapping[str, Any]:
        return {
            "method": facts.mcp_method or "",
            "tool": facts.mcp_tool or "",
            "args": dict(facts.mcp_args or {}),
        }

    def time() -> Mapping[str, Any]:
        now = facts.now.astimezone(UTC)
        # weekday as CEL's getDayOfWeek: 0 = Sunday ... 6 = Saturday (UTC).
        return {"hour": now.hour, "weekday": now.isoweekday() % 7}

    return Activation({"peer": peer, "request": request, "mcp": mcp, "time": time}, needs)
