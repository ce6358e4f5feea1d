"""The exchange's agent-protocol path (MCP, A2A): a POST body is read whole
and judged through the route's :class:`~proxy.http.agent_hook.AgentHook`;
the session then either has our answer in the protocol's own terms already
sent, or forwards the body with the hook's filter for the answer. Other
methods are judged by the request rules, and a GET may open a filtered
stream of server messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.http.agent_hook import FilterFactory
from proxy.http.answers import json_answer
from proxy.http.exchange import Ev, Exchange, PeerError
from proxy.http.headers import header_map
from proxy.http.relay import BodyEvent
from proxy.http.routing import Routed
from proxy.http.wire import Body, End, Request
from proxy.policy.verdict import RequestVerdict

if TYPE_CHECKING:
    from proxy.http.session import HttpSession


async def hooked_request(
    session: HttpSession, request: Request, routed: Routed, x: Exchange, body_pending: bool
) -> tuple[list[BodyEvent], FilterFactory | None] | None:
    """Judge a request through the agent-protocol hook. None when we
    answered it ourselves, else the body to forward and the filter for
    the answer."""
    hook = routed.hook
    assert hook is not None
    outcome = x.outcome
    headers = header_map(request.headers)
    path = routed.path
    if request.method != b"POST":
        if not routed.decision.allowed:
            outcome.reason, outcome.rule = routed.decision.reason, routed.decision.rule
            outcome.extra.update(routed.decision.audit_fields())
            await session.deny(x, routed, body_pending)
            return None
        if request.method == b"GET":
            return [], hook.stream_filter(headers, path)
        return [], None
    x.on(Ev.NEED_BODY)
    try:
        body = await session.down.read_whole_body(hook.max_body) if body_pending else b""
    except PeerError as exc:
        outcome.failed(exc)
        await session.refuse(x, exc.status, exc.message, close=True)
        return None
    verdict = hook.judge(body, headers, path)
    outcome.calls = verdict.calls
    outcome.reason, outcome.rule = verdict.reason, verdict.rule
    outcome.reply_headers = [(n.encode(), v.encode()) for n, v in verdict.headers]
    if not verdict.forward:
        outcome.decision = "deny"
        outcome.status = verdict.status
        outcome.bytes_up, outcome.bytes_down = len(body), len(verdict.body)
        session.down.queue(json_answer(outcome, verdict.status, verdict.body))
        if verdict.body:
            session.down.queue(Body(verdict.body))
        try:
            await session.down.send(End())
        except PeerError as exc:  # the client left or stopped reading
            outcome.error = exc.message
            x.on(Ev.CLOSE)
            return None
        x.on(Ev.ANSWERED)
        return None
    x.on(Ev.BODY_READ)
    # The session answers with the decision's own fields (RateLimit and
    # RateLimit-Policy of a rule with a rate), as for plain HTTP: they
    # belong on a forwarded call's answer too, not only on our refusal.
    # The http.request record names the policy version that judged the
    # calls, as a plain request's names the one that judged it.
    version = verdict.policy_version or routed.decision.policy_version
    if verdict.headers:
        quota = tuple(verdict.headers)
        routed.decision = RequestVerdict(
            True, verdict.reason, verdict.rule, version, status=200, headers=quota
        )
    else:
        routed.decision = _allowed(verdict.reason, verdict.rule, version)
    events: list[BodyEvent] = [Body(body)] if body else []
    events.append(End())
    return events, hook.answer_filter(verdict, headers, path)


# Verdicts are immutable, so one allowed verdict per (reason, rule, policy
# version) serves every forwarded body: building a RequestVerdict cost a
# microsecond per request. Rules and versions change only with the config;
# the bound keeps reloads from growing it.
_ALLOWED: dict[tuple[str, str | None, str], RequestVerdict] = {}


def _allowed(reason: str, rule: str | None, version: str) -> RequestVerdict:
    key = (reason, rule, version)
    verdict = _ALLOWED.get(key)
    if verdict is None:
        if len(_ALLOWED) >= 1024:
            _ALLOWED.clear()
        verdict = _ALLOWED[key] = RequestVerdict(True, reason, rule, version, status=200)
    return verdict
