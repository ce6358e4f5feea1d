"""The one value a request decision produces (pure).

:meth:`~proxy.policy.evaluate.PolicySet.evaluate` makes a
:class:`RequestVerdict` from the rules alone; the
:class:`~proxy.policy.gate.Gate` returns the same type with what its
pipeline added (quarantine, rate limits, step-up). The relay answers from
it and the audit record is made from it: no other decision type exists
between the rules and the record.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.ratelimit import Rate
from proxy.policy.rules import HighImpact

Header = tuple[str, str]


@dataclass(frozen=True, slots=True)
class RequestVerdict:
    allowed: bool
    reason: str  # the audit reason: rule_matched, no_matching_rule, rate_limited...
    rule: str | None
    policy_version: str = ""
    status: int = 403  # the HTTP status of a refusal (200 when allowed)
    headers: tuple[Header, ...] = ()  # for the client either way: RateLimit, Retry-After
    dry_run: tuple[tuple[str, str], ...] = ()  # (rule, "would_allow" | "would_deny")
    detail: str | None = None  # why it was refused, or what failed in a dry-run rule
    # What the rules asked the gate to enforce (empty once the gate has run).
    rates: tuple[tuple[str, Rate], ...] = ()  # (rule, rate), per peer and rule
    high_impact: tuple[tuple[str, HighImpact], ...] = ()  # (rule, step-up)
    log_args: tuple[str, ...] = ()  # argument names the allowing rule lets us log
    retry_after: float | None = None  # rate_limited: seconds
    quarantine_reason: str | None = None  # the tripwire quarantined the caller now
    quarantined_for: float | None = None  # ...for this many seconds

    @property
    def error(self) -> str | None:
        """``policy_error``: the condition that failed (the same as ``detail``)."""
        return self.detail

    def audit_fields(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.policy_version:  # absent when no rule set was consulted
            out["policy_version"] = self.policy_version
        if self.dry_run:
            out["dry_run"] = [{"rule": r, "outcome": o} for r, o in self.dry_run]
        if self.detail and not self.allowed:
            out["detail"] = self.detail
        if self.quarantine_reason is not None:
            out["quarantined_until_s"] = round(self.quarantined_for or 0.0, 1)
            out["quarantine_reason"] = self.quarantine_reason
        return out

    def reply_headers(self) -> list[tuple[bytes, bytes]]:
        return [(n.encode(), v.encode()) for n, v in self.headers]


def refused(reason: str, status: int = 403, detail: str | None = None) -> RequestVerdict:
    """A refusal decided before any rule ran (the router's own: CONNECT,
    an unknown egress host)."""
    return RequestVerdict(False, reason, None, status=status, detail=detail)
