"""The guard gate: everything that decides one request, in order.

1. a quarantined identity is refused (``quarantined``);
2. the listener's or route's :class:`~proxy.guard.policy.PolicySet` decides
   (deny over allow, dry-run reported, evaluation errors fail closed);
3. every matching allow rule's ``rate`` is charged, per peer and rule (429);
4. every matching allow rule's ``high_impact`` step-up is checked: a fresh
   SVID and/or a single-use approval token bound to this exact action;
5. the tripwire sees the outcome and may quarantine the identity.

The policy decides on data; the gate holds the per-process state (rate
table, quarantine, replay cache), so a config reload that swaps policies
keeps rate limits and quarantines.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import structlog

from proxy.guard.approval import ReplayCache, check_high_impact
from proxy.guard.policy import GuardDecision, PolicySet, RequestFacts
from proxy.guard.quarantine import GuardConfig, QuarantineEvent, Tripwire
from proxy.guard.ratelimit import RateLimiter
from proxy.guard.ratelimit import headers as rate_headers
from proxy.identity import SpiffeId, SpiffeIdError, TrustBundleSet
from proxy.runtime.admin import AdminServer
from proxy.runtime.admin import Response as AdminResponse

log = structlog.get_logger("agent_proxy")


@dataclass
class GateResult:
    allowed: bool
    reason: str
    rule: str | None
    status: int  # HTTP status for a refusal
    policy_version: str
    headers: list[tuple[str, str]] = field(default_factory=list)  # RateLimit, Retry-After
    dry_run: tuple[tuple[str, str], ...] = ()
    detail: str | None = None
    retry_after: float | None = None
    quarantine: QuarantineEvent | None = None
    log_args: tuple[str, ...] = ()

    def audit_fields(self) -> dict[str, object]:
        out: dict[str, object] = {"policy_version": self.policy_version}
        if self.dry_run:
            out["dry_run"] = [{"rule": r, "outcome": o} for r, o in self.dry_run]
        if self.detail:
            out["detail"] = self.detail
        if self.quarantine is not None:
            out["quarantined_until_s"] = round(self.quarantine.until - time.monotonic(), 1)
            out["quarantine_reason"] = self.quarantine.reason
        return out


class Gate:
    def __init__(self, config: GuardConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.limiter = RateLimiter(clock, max_entries=config.rate_table_size)
        self.tripwire = Tripwire(config, clock)
        self.quarantine = self.tripwire.quarantine
        self.replay = ReplayCache(max_entries=config.replay_cache_size)
        # The config's one policy version (set by the runtime plan); records
        # carry it instead of the deciding rule set's own hash.
        self.policy_version: str | None = None

    def check(
        self,
        policy: PolicySet,
        facts: RequestFacts,
        *,
        bundles: TrustBundleSet,
        approval_token: str | None = None,
        target: str | None = None,
        body_hash: str | None = None,
        decision: GuardDecision | None = None,
    ) -> GateResult:
        peer = facts.peer
        if peer is not None and self.quarantine.is_quarantined(peer) is not None:
            result = GateResult(
                False,
                "quarantined",
                None,
                403,
                policy.version,
                detail="this identity is quarantined",
            )
            result.policy_version = self.policy_version or result.policy_version
            return result
        if decision is None:  # callers that already decided pass it in
            decision = policy.evaluate(facts)
        result = self._apply(decision, facts, bundles, approval_token, target, body_hash)
        result.policy_version = self.policy_version or result.policy_version
        if peer is not None and self.config.enabled:
            seen = facts.mcp_tool or facts.resource_uri or facts.prompt_name or facts.path
            event = self.tripwire.observe(peer, result.allowed, seen)
            if event is not None:
                result.quarantine = event
                log.warning(
                    "identity quarantined", peer=str(peer), reason=event.reason, detail=event.detail
                )
        return result

    def _apply(
        self,
        decision: GuardDecision,
        facts: RequestFacts,
        bundles: TrustBundleSet,
        token: str | None,
        target: str | None,
        body_hash: str | None,
    ) -> GateResult:
        def result(allowed: bool, reason: str, status: int, **kw: Any) -> GateResult:
            return GateResult(
                allowed,
                reason,
                decision.rule,
                status,
                decision.policy_version,
                dry_run=decision.dry_run,
                log_args=decision.log_args,
                **kw,
            )

        if not decision.allowed:
            return result(False, decision.reason, 403, detail=decision.error)
        peer_key = str(facts.peer) if facts.peer is not None else "-"
        extra: list[tuple[str, str]] = []
        for rule_name, rate in decision.rates:
            outcome = self.limiter.check((peer_key, rule_name), rate)
            extra.extend(rate_headers(outcome, rate, rule_name))
            if not outcome.allowed:
                return result(
                    False,
                    "rate_limited",
                    429,
                    headers=extra,
                    retry_after=outcome.retry_after_s,
                    detail=f"rate {rate} exceeded for rule {rule_name}",
                )
        for rule_name, step in decision.high_impact:
            if facts.peer is None:
                return result(
                    False,
                    "attestation_unknown",
                    403,
                    detail="a high-impact action needs a verified caller",
                )
            approval = check_high_impact(
                max_svid_age=step.max_svid_age,
                approvers=step.approvers,
                svid_age_seconds=facts.svid_age_seconds,
                token=token,
                bundles=bundles,
                requester=facts.peer,
                method=facts.mcp_method or facts.method,
                target=target or facts.path,
                body_hash=body_hash or "",
                now=facts.now,
                replay=self.replay,
            )
            if not approval.ok:
                return result(False, approval.reason, 403, detail=f"{rule_name}: {approval.detail}")
        return result(True, decision.reason, 200, headers=extra)


def svid_age_seconds(not_before: _dt.datetime, now: _dt.datetime) -> float:
    return max(0.0, (now - not_before).total_seconds())


def install_guard_routes(admin: AdminServer, gate: Gate) -> None:
    """Admin: list quarantines, release one (loopback clients only)."""

    async def list_quarantines(request: h11.Request, body: bytes) -> AdminResponse:
        now = gate.clock()
        items = [
            {
                "peer": str(e.peer),
                "reason": e.reason,
                "detail": e.detail,
                "remaining_s": round(max(0.0, e.until - now), 1),
            }
            for e in gate.quarantine.list()
        ]
        return 200, [("content-type", "application/json")], json.dumps(items).encode() + b"\n"

    async def release(request: h11.Request, body: bytes) -> AdminResponse:
        try:
            doc = json.loads(body or b"{}")
            peer = SpiffeId.parse(str(doc["peer"]))
        except (ValueError, KeyError, TypeError, SpiffeIdError) as exc:
            return 400, [("content-type", "text/plain")], f"bad request: {exc}\n".encode()
        if not gate.quarantine.release(peer):
            return 404, [("content-type", "text/plain")], b"not quarantined\n"
        log.info("quarantine released", peer=str(peer))
        return (
            200,
            [("content-type", "application/json")],
            json.dumps({"released": str(peer)}).encode() + b"\n",
        )

    admin.add_route("GET", "/guard/quarantines", list_quarantines, loopback_only=True)
    admin.add_route("POST", "/guard/quarantines/release", release, loopback_only=True)
