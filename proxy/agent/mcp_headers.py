"""MCP 2026-07-28 mirrored headers: the version, method and target name a
request repeats in ``MCP-Protocol-Version``, ``Mcp-Method`` and ``Mcp-Name``
must agree with its body, or it is a ``-32020`` HeaderMismatch (pure)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from proxy.agent.jsonrpc import (
    INVALID_PARAMS,
    JsonRpcError,
)
from proxy.agent.mcp import (
    _NAME_SOURCE,
    HEADER_MISMATCH,
    HEADER_MISMATCH_HTTP_STATUS,
    META_PROTOCOL_VERSION,
    METHOD_HEADER,
    NAME_HEADER,
    PROTOCOL_VERSION_HEADER,
    McpCall,
    _meta_version,
    is_2026,
    lower_headers,
)

_BASE64_PREFIX, _BASE64_SUFFIX = "=?base64?", "?="

_HEADER_VALUE_OK = re.compile(r"^[\t\x20-\x7e]*$")


def _mismatch(call: McpCall, what: str) -> JsonRpcError:
    return JsonRpcError(
        HEADER_MISMATCH,
        f"Header mismatch: {what}",
        call.id,
        http_status=HEADER_MISMATCH_HTTP_STATUS,
    )


def decode_header_value(value: str) -> str | None:
    """A mirrored header value, Base64 sentinel (``=?base64?...?=``) decoded;
    None if malformed (bad characters, bad Base64, not UTF-8)."""
    if not _HEADER_VALUE_OK.match(value):
        return None
    if value.startswith(_BASE64_PREFIX) and value.endswith(_BASE64_SUFFIX):
        encoded = value[len(_BASE64_PREFIX) : len(value) - len(_BASE64_SUFFIX)]
        try:
            return base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


def check_mirrored_headers(call: McpCall, headers: Mapping[str, str]) -> JsonRpcError | None:
    """For 2026-07-28: the mirrored headers must be present and match the body.

    ``MCP-Protocol-Version`` must equal ``_meta``'s version (and ``_meta``
    must carry one: -32602 if not); ``Mcp-Method`` must equal the method
    (required on requests; checked on notifications when sent); ``Mcp-Name``
    must equal params.name (tools/call, prompts/get) or params.uri
    (resources/read), after Base64-sentinel decoding. An ``Mcp-Name`` on a
    request whose body names nothing is a mismatch too: some hop could be
    routing on it. ``Mcp-Param-*`` headers need the tool's inputSchema and are
    left to the server (our policy reads the body, never those headers).
    Returns the error to answer (HTTP 400), or None. Other versions: None.
    """
    if not is_2026(call.version) or call.method is None:
        return None
    lower = lower_headers(headers)
    meta = _meta_version(call.message)
    header_version = lower.get(PROTOCOL_VERSION_HEADER)
    # 2026-07-28 defines no client notifications over HTTP and no header rules
    # for them: for a notification only what is sent has to agree.
    if meta is None and not call.is_notification:
        return JsonRpcError(
            INVALID_PARAMS, f"Invalid params: _meta {META_PROTOCOL_VERSION} is required", call.id
        )
    if header_version is None:
        if not call.is_notification:
            return _mismatch(call, "missing MCP-Protocol-Version header")
    elif meta is not None and header_version.strip() != meta:
        return _mismatch(call, f"MCP-Protocol-Version does not match _meta {META_PROTOCOL_VERSION}")

    method_header = lower.get(METHOD_HEADER)
    if method_header is None:
        if not call.is_notification:
            return _mismatch(call, "missing Mcp-Method header")
    elif not _HEADER_VALUE_OK.match(method_header) or method_header.strip() != call.method:
        return _mismatch(call, "Mcp-Method does not match the body's method")

    params = call.params
    source = _NAME_SOURCE.get(call.method)
    if source is None:  # any other method: the name, if the body has one
        source = next((k for k in ("name", "uri") if isinstance(params.get(k), str)), None)
    body_name = params.get(source) if source is not None else None
    name_header = lower.get(NAME_HEADER)
    if name_header is None:
        if call.method in _NAME_SOURCE:
            return _mismatch(call, "missing Mcp-Name header")
        return None
    decoded = decode_header_value(name_header.strip())
    if decoded is None:
        return _mismatch(call, "malformed Mcp-Name header")
    if not isinstance(body_name, str) or decoded != body_name:
        return _mismatch(call, f"Mcp-Name does not match params.{source or 'name'}")
    return None
