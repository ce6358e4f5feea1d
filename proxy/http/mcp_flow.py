"""MCP over Streamable HTTP in the relay: decide per JSON-RPC call, answer
denials in MCP's own terms, and filter list answers down to what the caller
may use.

Theory of operation: for a ``protocol = "mcp"`` listener or route the
session buffers each POST body (up to ``max_body_bytes``), and
:meth:`McpGuard.judge` parses it strictly and runs every call through the
gate. A denial is answered by us with HTTP 200 and a JSON-RPC error (or an
``isError`` result for forbidden arguments), because MCP clients read a 403
as a cue for OAuth and a 404 as a dead session. Allowed bodies go upstream
unchanged. The answer to a ``*/list`` request is filtered, whether it comes
back as JSON (buffered, filtered, re-framed) or as an SSE stream (rewritten
event by event; every other byte passes unchanged). GET streams (server
messages, replays after ``Last-Event-ID``) are filtered by shape.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.agent import mcp, mcp_answers, mcp_headers
from proxy.agent.jsonrpc import (
    IdKey,
    JsonRpcError,
    args_sha256,
    dumps,
    parse_message,
)
from proxy.agent.sse import SseFilter, make_list_transform
from proxy.http.agent_hook import Judgement as Verdict
from proxy.identity import SpiffeId, TrustBundleSet
from proxy.policy.approval import APPROVAL_HEADER, APPROVAL_META_KEY
from proxy.policy.evaluate import PolicySet
from proxy.policy.gate import Gate
from proxy.policy.rules import RequestFacts

_KIND = {"tools/list": "tool", "prompts/list": "prompt", "resources/list": "resource"}
_MAX_RESPONSE = 64 << 20


@dataclass
class McpGuard:
    policy: Callable[[], PolicySet]
    gate: Gate
    peer: SpiffeId | None
    svid_age: float | None
    bundles: TrustBundleSet
    max_body: int
    peer_auth: str | None = None  # how the peer proved itself (rules: peer.auth)

    def _facts(self, headers: dict[str, str], path: str, call: mcp.McpCall | None) -> RequestFacts:
        return RequestFacts(
            peer=self.peer,
            method="POST" if call is not None else "GET",
            path=path,
            now=_dt.datetime.now(_dt.UTC),
            svid_age_seconds=self.svid_age,
            headers=headers,
            mcp_method=call.method if call is not None else None,
            mcp_tool=call.tool if call is not None else None,
            mcp_args=call.arguments if call is not None and call.tool else None,
            resource_uri=call.resource_uri if call is not None else None,
            prompt_name=call.prompt_name if call is not None else None,
            peer_auth=self.peer_auth,
        )

    def list_policy(self, headers: dict[str, str], path: str) -> mcp.ListPolicy:
        policy = self.policy()
        facts = self._facts(headers, path, None)

        def allowed(method: str, name: str) -> bool:
            kind = _KIND.get(method)
            return kind is not None and policy.visible(facts, kind, name)  # type: ignore[arg-type]

        return allowed

    def answer_filter(
        self, verdict: Verdict, headers: dict[str, str], path: str
    ) -> Callable[[str], ResponseFilter] | None:
        if not verdict.pending:
            return None
        policy = self.list_policy(headers, path)
        pending, version = verdict.pending, verdict.version
        return lambda ctype: ResponseFilter(pending, policy, version, ctype, infer=False)

    def stream_filter(
        self, headers: dict[str, str], path: str
    ) -> Callable[[str], ResponseFilter] | None:
        """GET streams: server messages and replays after Last-Event-ID."""
        policy = self.list_policy(headers, path)
        version = headers.get("mcp-protocol-version") or mcp.DEFAULT_VERSION
        return lambda ctype: ResponseFilter({}, policy, version, ctype, infer=True)

    def judge(self, body: bytes, headers: dict[str, str], path: str) -> Verdict:
        headers = mcp.lower_headers(headers)  # once, for every check below
        try:
            parsed = parse_message(body, max_bytes=self.max_body, allow_batch=True)
            calls = mcp.extract_calls(parsed, headers, None)
        except JsonRpcError as exc:
            return Verdict(False, exc.http_status, exc.to_bytes(), reason="bad_jsonrpc")
        version = calls[0].version if calls else mcp.DEFAULT_VERSION
        verdict = Verdict(True, version=version, pending=mcp.pending_list_requests(calls))
        answers: list[bytes] = []
        policy = self.policy()
        denied_any = False
        modern = mcp.is_2026(version)
        for call in calls:
            if modern and call.method is not None:
                mismatch = mcp_headers.check_mirrored_headers(call, headers)
                if mismatch is not None:
                    refused = {
                        "args_sha256": args_sha256(call.arguments or {}) if call.tool else None,
                        "session": call.session_id,
                        "mcp_method": call.method,
                        "tool": call.tool,
                        "resource": call.resource_uri or call.prompt_name,
                        "protocol_version": version,
                        "decision": "deny",
                        "reason": "mcp_header_mismatch",
                        "rule": None,
                    }
                    return Verdict(
                        False,
                        mcp.HEADER_MISMATCH_HTTP_STATUS,
                        mismatch.to_bytes(),
                        version=version,
                        reason="mcp_header_mismatch",
                        calls=[refused],
                    )
            if call.method is None:
                continue  # a client's response (legacy): nothing to decide
            facts = self._facts(headers, path, call)
            token = _approval_token(call, headers)
            target = call.tool or call.resource_uri or call.prompt_name or path
            # One canonical hash serves the approval binding and the audit record.
            body_hash = args_sha256(call.arguments or {})
            result = self.gate.check(
                policy,
                facts,
                bundles=self.bundles,
                approval_token=token,
                target=target,
                body_hash=body_hash,
            )
            entry: dict[str, Any] = {
                "mcp_method": call.method,
                "tool": call.tool,
                "resource": call.resource_uri or call.prompt_name,
                "session": call.session_id,
                "protocol_version": version,
                "decision": "allow" if result.allowed else "deny",
                "reason": result.reason,
                "rule": result.rule,
                "args_sha256": body_hash if call.tool else None,
                **result.audit_fields(),
            }
            if result.log_args and call.arguments:
                entry["args"] = {
                    k: call.arguments[k] for k in result.log_args if k in call.arguments
                }
            verdict.calls.append(entry)
            verdict.headers.extend(result.headers)
            verdict.policy_version = result.policy_version
            if result.allowed:
                verdict.rule = verdict.rule or result.rule
                continue
            denied_any = True
            verdict.reason, verdict.rule = result.reason, result.rule
            if call.id is None:
                continue  # a denied notification gets no answer
            answers.append(
                self._denial(
                    call, result.reason, result.detail, result.retry_after, policy, facts, version
                )
            )
        if not denied_any:
            return verdict
        verdict.forward = False
        if parsed.is_batch:
            # One denied call refuses the whole batch: each request id gets an answer.
            denied_ids = {
                c.id_key
                for c, e in zip(calls, verdict.calls, strict=False)
                if e["decision"] == "deny"
            }
            for call in calls:
                if call.id is not None and call.id_key not in denied_ids:
                    answers.append(
                        mcp_answers.denied(call.id, "batch refused: it contains a denied call")
                    )
            verdict.body = b"[" + b",".join(answers) + b"]"
        else:
            verdict.body = answers[0] if answers else b""
            verdict.status = 200 if answers else 202
        return verdict

    def _denial(
        self,
        call: mcp.McpCall,
        reason: str,
        detail: str | None,
        retry_after: float | None,
        policy: PolicySet,
        facts: RequestFacts,
        version: str,
    ) -> bytes:
        assert call.id is not None
        if reason == "rate_limited":
            return mcp_answers.rate_limited(call.id, retry_after or 1.0)
        if call.method == "tools/call" and call.tool is not None:
            if not policy.visible(facts, "tool", call.tool):
                return mcp_answers.unknown_tool(call.id, call.tool)  # hidden tools do not exist
            text = f"refused by policy ({reason})" + (f": {detail}" if detail else "")
            return mcp_answers.forbidden_arguments(call.id, text, version)
        return mcp_answers.denied(call.id, reason)


_APPROVAL_HEADER = APPROVAL_HEADER.lower()


def _approval_token(call: mcp.McpCall, headers: dict[str, str]) -> str | None:
    params = call.message.params  # McpCall.params, without the property call
    meta = params.get("_meta") if isinstance(params, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get(APPROVAL_META_KEY), str):
        return str(meta[APPROVAL_META_KEY])
    return headers.get(_APPROVAL_HEADER)


class ResponseFilter:
    """Rewrites (or just reads) an answer: JSON bodies whole, SSE by event.

    By default it filters MCP list answers; ``json_step`` and ``sse_step``
    replace that (A2A only reads answers, to learn who owns which task).
    """

    def __init__(
        self,
        pending: dict[IdKey, str],
        policy: mcp.ListPolicy,
        version: str,
        content_type: str,
        *,
        infer: bool,
        json_step: Callable[[bytes], bytes | None] | None = None,
        sse_step: Callable[[str], str | None] | None = None,
    ) -> None:
        self.pending, self.policy, self.version, self.infer = pending, policy, version, infer
        self.json_step = json_step
        transform = sse_step or make_list_transform(pending, policy, version)
        self.sse = SseFilter(transform) if "text/event-stream" in content_type else None
        self.json_parts: list[bytes] = []
        self.size = 0

    @property
    def whole(self) -> bool:
        return self.sse is None

    def feed(self, data: bytes) -> bytes:
        if self.sse is not None:
            return self.sse.feed(data)
        self.size += len(data)
        if self.size > _MAX_RESPONSE:
            raise mcp.UnfilterableResponse("response too large to inspect")
        self.json_parts.append(data)
        return b""

    def finish(self) -> bytes:
        if self.sse is not None:
            return self.sse.close()
        body = b"".join(self.json_parts)
        if self.json_step is not None:
            filtered = self.json_step(body)
        else:
            filtered = mcp_answers.filter_responses(
                body, self.pending, self.policy, self.version, infer=self.infer
            )
        return body if filtered is None else filtered


__all__ = ["McpGuard", "ResponseFilter", "Verdict", "dumps"]
