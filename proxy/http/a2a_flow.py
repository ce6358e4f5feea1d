"""A2A over HTTP (JSON-RPC) in the relay: method policy per peer, task
ownership, push-notification URL allowlists.

Method names of both generations (v0.3 ``message/send``, v1.0
``SendMessage``) are normalised to the v1.0 names before policy sees them,
as ``mcp.method`` in conditions, so one rule covers both. A task belongs to
the identity whose SendMessage created it (learned from the answer, JSON or
SSE); for everyone else it does not exist (TaskNotFound, -32001), which
says nothing about whether it exists. The Agent Card is never rewritten:
GETs pass through untouched, so a signed card keeps its signature valid.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.agent import a2a, a2a_push
from proxy.agent.jsonrpc import (
    JsonRpcError,
    decode_json,
    error_response,
    parse_message,
)
from proxy.agent.mcp_answers import denied
from proxy.http.mcp_flow import ResponseFilter, Verdict
from proxy.identity import SpiffeId, TrustBundleSet
from proxy.policy.evaluate import PolicySet
from proxy.policy.gate import Gate
from proxy.policy.rules import RequestFacts

METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602


@dataclass
class A2aGuard:
    policy: Callable[[], PolicySet]
    gate: Gate
    peer: SpiffeId | None
    svid_age: float | None
    bundles: TrustBundleSet
    max_body: int
    tasks: a2a.TaskOwnership
    peer_auth: str | None = None  # how the peer proved itself (rules: peer.auth)

    @property
    def owner(self) -> str:
        return str(self.peer) if self.peer is not None else "agent"

    def judge(self, body: bytes, headers: dict[str, str], path: str) -> Verdict:
        try:
            message = parse_message(body, max_bytes=self.max_body, allow_batch=False).single
        except JsonRpcError as exc:
            return Verdict(False, exc.http_status, exc.to_bytes(), reason="bad_jsonrpc")
        if message is None or message.method is None or message.id is None:
            msg_id = message.id if message is not None else None
            return Verdict(
                False,
                400,
                error_response(msg_id, -32600, "expected a request"),
                reason="bad_jsonrpc",
            )
        normal = a2a.normalize_method(message.method)
        if normal is None:
            return self._refuse(
                message.id,
                message.method,
                "unknown_method",
                error_response(message.id, METHOD_NOT_FOUND, "Method not found"),
            )
        method, version = normal
        params = message.params if isinstance(message.params, dict) else {}
        facts = RequestFacts(
            peer=self.peer,
            method="POST",
            path=path,
            now=_dt.datetime.now(_dt.UTC),
            svid_age_seconds=self.svid_age,
            headers=headers,
            mcp_method=method,
            peer_auth=self.peer_auth,
        )
        policy = self.policy()
        result = self.gate.check(policy, facts, bundles=self.bundles, target=method)
        entry: dict[str, Any] = {
            "a2a_method": method,
            "a2a_version": version,
            "decision": "allow" if result.allowed else "deny",
            "reason": result.reason,
            "rule": result.rule,
            **result.audit_fields(),
        }
        verdict = Verdict(
            True,
            reason=result.reason,
            rule=result.rule,
            calls=[entry],
            headers=list(result.headers),
            policy_version=result.policy_version,
        )
        if not result.allowed:
            return self._deny(verdict, entry, denied(message.id, result.reason))
        try:
            task_ids = a2a.task_ids_in_request(method, params)
            urls = a2a_push.push_urls_in_request(method, params)
        except a2a.A2aParamsError as exc:
            return self._deny(
                verdict,
                entry,
                error_response(message.id, INVALID_PARAMS, str(exc)),
                "invalid_params",
            )
        if task_ids and not self.tasks.check_all(task_ids, self.owner):
            # Someone else's task, or none: the same answer either way.
            return self._deny(verdict, entry, a2a.task_not_found(message.id), "task_not_owned")
        if urls:
            allowlist = _push_allowlist(policy, result.rule)
            if not all(a2a_push.push_url_allowed(u, allowlist) for u in urls):
                return self._deny(
                    verdict,
                    entry,
                    denied(message.id, "push_url_not_allowed"),
                    "push_url_not_allowed",
                )
        entry["tasks"] = task_ids or None
        verdict.version = version
        verdict.pending = {("method", 0): method} if method in a2a.TASK_CREATING else {}
        return verdict

    def _refuse(self, id: Any, method: str, reason: str, body: bytes) -> Verdict:
        entry = {"a2a_method": method[:100], "decision": "deny", "reason": reason, "rule": None}
        return Verdict(False, 200, body, reason=reason, calls=[entry])

    def _deny(
        self, verdict: Verdict, entry: dict[str, Any], body: bytes, reason: str | None = None
    ) -> Verdict:
        if reason is not None:
            entry["decision"], entry["reason"] = "deny", reason
            verdict.reason = reason
        verdict.forward, verdict.status, verdict.body = False, 200, body
        return verdict

    def answer_filter(
        self, verdict: Verdict, headers: dict[str, str], path: str
    ) -> Callable[[str], ResponseFilter] | None:
        if not verdict.pending:
            return None
        owner, tasks = self.owner, self.tasks

        def learn(obj: Any) -> None:
            for task_id in a2a.task_ids_in_response(obj):
                tasks.record(task_id, owner)

        def json_step(body: bytes) -> None:
            with contextlib.suppress(JsonRpcError):
                learn(decode_json(body, max_bytes=self.max_body * 64))
            return None  # never rewritten

        def sse_step(data: str) -> None:
            with contextlib.suppress(ValueError):
                learn(json.loads(data))
            return None

        return lambda ctype: ResponseFilter(
            {},
            _no_lists,
            verdict.version,
            ctype,
            infer=False,
            json_step=json_step,
            sse_step=sse_step,
        )

    def stream_filter(
        self, headers: dict[str, str], path: str
    ) -> Callable[[str], ResponseFilter] | None:
        return None  # GETs (the Agent Card) pass through byte for byte


def _no_lists(method: str, name: str) -> bool:
    return True


def _push_allowlist(policy: PolicySet, rule: str | None) -> tuple[str, ...]:
    for candidate in policy.rules:
        if candidate.name == rule:
            return candidate.push_url_allowlist
    return ()
