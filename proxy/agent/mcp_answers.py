"""What we say and rewrite in MCP's terms (pure): denials (HTTP 200 with a
JSON-RPC error or an ``isError`` result; see :mod:`proxy.agent.mcp`) and
list results filtered down to what the caller may use, marked private
where the version has caching hints."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from proxy.agent.jsonrpc import (
    INVALID_PARAMS,
    BodyTooLarge,
    IdKey,
    JsonRpcError,
    JsonRpcId,
    MessageKind,
    decode_json,
    dumps,
    error_response,
    id_key,
    is_json,
    result_response,
    validate_message,
)
from proxy.agent.mcp import (
    LIST_METHODS,
    POLICY_DENIED,
    RATE_LIMITED,
    ListPolicy,
    UnfilterableResponse,
    is_2026,
    supports_cache_scope,
)

_MAX_ECHO = 200  # never reflect an unbounded client string back


def unknown_tool(id: JsonRpcId | None, name: str) -> bytes:
    """What a server says for a tool it does not have (tools spec: -32602).

    A tool the caller may not use is answered as unknown: the caller learns
    nothing about tools it cannot see in its (filtered) tools/list.
    """
    return error_response(id, INVALID_PARAMS, f"Unknown tool: {name[:_MAX_ECHO]}")


def forbidden_arguments(id: JsonRpcId, reason: str, version: str | None = None) -> bytes:
    """A tool *execution* error (result with ``isError: true``) the model can read
    and correct its arguments by; 2026-07-28 results carry ``resultType``."""
    result: dict[str, Any] = {}
    if version is not None and is_2026(version):
        result["resultType"] = "complete"
    result["content"] = [{"type": "text", "text": reason}]
    result["isError"] = True
    return result_response(id, result)


def denied(id: JsonRpcId | None, reason: str, code: int = POLICY_DENIED) -> bytes:
    """A policy denial for any other method (see :data:`POLICY_DENIED`).

    For a notification there is no id to answer: the transport wants an HTTP
    error status (e.g. 400) and this body with a null id at most.
    """
    return error_response(id, code, reason)


def rate_limited(id: JsonRpcId | None, retry_after_s: float) -> bytes:
    """Rate limited; ``data.retry_after`` in whole seconds, at least 1."""
    seconds = max(1, math.ceil(retry_after_s)) if math.isfinite(retry_after_s) else 1
    return error_response(id, RATE_LIMITED, "Rate limit exceeded", {"retry_after": seconds})


# -- list filtering ---------------------------------------------------------------------


def _filter_result(result: dict[str, Any], methods: list[str], policy: ListPolicy) -> None:
    for method in methods:
        member, key = LIST_METHODS[method]
        items = result.get(member)
        if not isinstance(items, list):
            result[member] = []  # present but malformed: show nothing
            continue
        result[member] = [
            item
            for item in items
            if isinstance(item, dict)
            and isinstance(item.get(key), str)
            and policy(method, item[key])
        ]


def _mark_private(result: dict[str, Any], version: str) -> None:
    # SEP-2549: interim input_required results carry no caching hints.
    if supports_cache_scope(version) and result.get("resultType", "complete") == "complete":
        result["cacheScope"] = "private"


def infer_list_methods(result: Any) -> list[str]:
    """The list methods whose result shape ``result`` has (an array under
    ``tools``, ``prompts`` or ``resources``). Filtering those is always safe."""
    if not isinstance(result, dict):
        return []
    return [m for m, (member, _) in LIST_METHODS.items() if isinstance(result.get(member), list)]


def _filter_response_obj(
    response: dict[str, Any],
    pending: Mapping[IdKey, str],
    policy: ListPolicy,
    version: str,
    infer: bool,
) -> bool:
    """Filter one response object in place; True if it was a list response."""
    result = response.get("result")
    if "error" in response or not isinstance(result, dict):
        return False
    raw_id = response.get("id")
    key = None if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) else id_key(raw_id)
    if key is not None and key in pending:
        method = pending[key]
        methods = [method] if method in LIST_METHODS else []
        if methods and LIST_METHODS[method][0] not in result:
            methods = []  # a malformed result: the client rejects it; leave it
    elif infer:
        methods = infer_list_methods(result)
    else:
        methods = []
    if not methods:
        return False
    _filter_result(result, methods, policy)
    _mark_private(result, version)
    return True


def filter_list_result(
    message: bytes | Mapping[str, Any],
    method: str,
    allowed: Callable[[str], bool],
    version: str,
) -> bytes:
    """One list response, filtered to what ``allowed(name_or_uri)`` admits.

    Every other member (``nextCursor``, ``ttlMs``, ``_meta``, ...) is kept and
    key order is preserved; 2026-07-28 results get ``cacheScope: "private"``.
    Error responses and non-list methods come back unchanged. Raises
    JsonRpcError if ``message`` is not a strict JSON-RPC response.
    """
    if method not in LIST_METHODS:
        return bytes(message) if isinstance(message, bytes) else dumps(dict(message))
    if isinstance(message, bytes):
        obj = decode_json(message, max_bytes=len(message))
    else:
        obj = decode_json(dumps(dict(message)), max_bytes=1 << 62)  # deep copy, same checks
    parsed = validate_message(obj)
    if parsed.kind is not MessageKind.RESULT or parsed.id is None:
        return message if isinstance(message, bytes) else dumps(obj)
    _filter_response_obj(
        obj, {id_key(parsed.id): method}, lambda _m, name: allowed(name), version, infer=False
    )
    return dumps(obj)


def filter_responses(
    body: bytes | str,
    pending: Mapping[IdKey, str],
    policy: ListPolicy,
    version: str,
    *,
    infer: bool,
    max_bytes: int = 64 << 20,
) -> bytes | None:
    """Filter the list responses in a response body (one object or a batch).

    A response is filtered when its id is a pending list request, or (with
    ``infer``: replays, SSE streams) when its result has a list's shape.
    Returns the re-serialised body, or None when nothing in it is a list
    response (pass it on untouched); a body that is not JSON at all is None
    too (no client acts on it as MCP).

    Raises :class:`UnfilterableResponse` (fail closed) when the body is JSON
    we refuse to interpret (duplicate keys, NaN, lone surrogates, too deep,
    too large: a lenient client could still read a list out of it), or when
    an element that looks like a list response is not valid JSON-RPC.
    """
    try:
        value = decode_json(body, max_bytes=max_bytes)
    except JsonRpcError as exc:
        text = body if isinstance(body, str) else body.decode("utf-8", "replace")
        if isinstance(exc, BodyTooLarge) or is_json(text):
            raise UnfilterableResponse(exc.message) from None
        return None
    changed = False
    for item in value if isinstance(value, list) else [value]:
        try:
            validate_message(item)
        except JsonRpcError as exc:
            if isinstance(item, dict) and _looks_like_list_response(item, pending):
                raise UnfilterableResponse(exc.message) from None
            continue
        changed |= _filter_response_obj(item, pending, policy, version, infer)
    return dumps(value) if changed else None


def _looks_like_list_response(item: dict[str, Any], pending: Mapping[IdKey, str]) -> bool:
    if infer_list_methods(item.get("result")):
        return True
    raw_id = item.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return False
    return pending.get(id_key(raw_id)) in LIST_METHODS
