"""The guard gate: everything that decides one request, in order (pure).

1. a quarantined identity is refused (``quarantined``);
2. the listener's or route's :class:`~proxy.policy.evaluate.PolicySet`
   decides (deny over allow, dry-run reported, evaluation errors fail closed);
3. every matching allow rule's ``rate`` is charged, per peer and rule (429);
4. every matching allow rule's ``high_impact`` step-up is checked: a fresh
   SVID and/or a single-use approval token bound to this exact action;
5. the tripwire sees the outcome and may quarantine the identity.

The rules decide on data; the gate holds the per-process state (rate
table, quarantine, replay cache), so a config reload that swaps policies
keeps rate limits and quarantines. Its clock is passed in (monotonic
seconds, ``time.monotonic`` unless told; a fake in tests) and wall-clock
time arrives in :class:`RequestFacts`. The result
is one :class:`~proxy.policy.verdict.RequestVerdict`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from collections.abc import Callable

from proxy.identity import TrustBundleSet
from proxy.policy.approval import ReplayCache, check_high_impact
from proxy.policy.evaluate import PolicySet
from proxy.policy.quarantine import GuardConfig, Tripwire
from proxy.policy.ratelimit import RateLimiter
from proxy.policy.ratelimit import headers as rate_headers
from proxy.policy.rules import RequestFacts
from proxy.policy.verdict import RequestVerdict


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
        decision: RequestVerdict | None = None,
    ) -> RequestVerdict:
        peer = facts.peer
        version = self.policy_version or policy.version
        if peer is not None and self.quarantine.is_quarantined(peer) is not None:
            return RequestVerdict(
                False, "quarantined", None, version, detail="this identity is quarantined"
            )
        if decision is None:  # callers that already decided pass it in
            decision = policy.evaluate(facts, version)  # no replace() for the version
        result = self._apply(decision, facts, bundles, approval_token, target, body_hash)
        if result.policy_version != version:  # replace() is not free: once per request
            result = dataclasses.replace(result, policy_version=version)
        if peer is not None and self.config.enabled:
            seen = facts.mcp_tool or facts.resource_uri or facts.prompt_name or facts.path
            event = self.tripwire.observe(peer, result.allowed, seen)
            if event is not None:
                result = dataclasses.replace(
                    result,
                    quarantine_reason=event.reason,
                    quarantined_for=max(0.0, event.until - self.clock()),
                )
        return result

    def _apply(
        self,
        decision: RequestVerdict,
        facts: RequestFacts,
        bundles: TrustBundleSet,
        token: str | None,
        target: str | None,
        body_hash: str | None,
    ) -> RequestVerdict:
        # What the gate enforced is done: the verdict no longer carries it.
        decided = (
            dataclasses.replace(decision, rates=(), high_impact=())
            if decision.rates or decision.high_impact
            else decision
        )
        if not decision.allowed:
            return dataclasses.replace(decided, status=403)
        peer_key = str(facts.peer) if facts.peer is not None else "-"
        extra: list[tuple[str, str]] = []
        for rule_name, rate in decision.rates:
            outcome = self.limiter.check((peer_key, rule_name), rate)
            extra.extend(rate_headers(outcome, rate, rule_name))
            if not outcome.allowed:
                return dataclasses.replace(
                    decided,
                    allowed=False,
                    reason="rate_limited",
                    status=429,
                    headers=tuple(extra),
                    retry_after=outcome.retry_after_s,
                    detail=f"rate {rate} exceeded for rule {rule_name}",
                )
        for rule_name, step in decision.high_impact:
            if facts.peer is None:
                return dataclasses.replace(
                    decided,
                    allowed=False,
                    reason="attestation_unknown",
                    status=403,
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
                return dataclasses.replace(
                    decided,
                    allowed=False,
                    reason=approval.reason,
                    status=403,
                    detail=f"{rule_name}: {approval.detail}",
                )
        if decided.status == 200 and not extra and decided.headers == () and decided.detail is None:
            return decided  # nothing to change: no copy per request
        return dataclasses.replace(decided, status=200, headers=tuple(extra), detail=None)


def svid_age_seconds(not_before: _dt.datetime, now: _dt.datetime) -> float:
    return max(0.0, (now - not_before).total_seconds())
