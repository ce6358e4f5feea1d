"""MCP over Streamable HTTP: versions, calls, header checks, denials, list filtering (pure).

Theory of operation: Streamable HTTP has two generations on the wire.

- Legacy (2025-03-26, 2025-06-18, 2025-11-25): an ``initialize`` handshake
  negotiates the version, a session may be named by ``Mcp-Session-Id``,
  POST and GET, SSE responses, and JSON-RPC batches in 2025-03-26 only.
- Modern (2026-07-28): stateless. Every request carries its version in
  ``params._meta["io.modelcontextprotocol/protocolVersion"]`` and mirrors it,
  the method and the target name into ``MCP-Protocol-Version``, ``Mcp-Method``
  and ``Mcp-Name`` headers; a header that is missing or disagrees with the
  body is a ``-32020`` HeaderMismatch with HTTP 400.

The version decides what is legal (batches, mirrored headers, ``cacheScope``),
so :func:`detect_version` never guesses past what the spec allows and refuses
versions it does not know: a newer revision may change exactly the rules
this module enforces.

Policy denials are answered in MCP's own terms with HTTP 200: MCP clients
read a 404 as "session terminated" and a 403 carrying insufficient_scope as
an OAuth step-up, neither of which is what a policy denial means.

List results (tools/list, prompts/list, resources/list) are filtered down to
what the caller may use. A filtered list is specific to the caller, so on
versions with SEP-2549 caching hints it is marked ``cacheScope: "private"``
(a shared cache must not hand one caller's view to another).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from proxy.agent.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    BodyTooLarge,
    IdKey,
    JsonRpcError,
    JsonRpcId,
    JsonRpcMessage,
    MessageKind,
    ParsedBody,
    decode_json,
    dumps,
    error_response,
    id_key,
    is_json,
    result_response,
    validate_message,
)

# -- versions -------------------------------------------------------------------

V2025_03_26: Final = "2025-03-26"
V2025_06_18: Final = "2025-06-18"
V2025_11_25: Final = "2025-11-25"
V2026_07_28: Final = "2026-07-28"
LEGACY_VERSIONS: Final = (V2025_03_26, V2025_06_18, V2025_11_25)
MODERN_VERSIONS: Final = (V2026_07_28,)
KNOWN_VERSIONS: Final = LEGACY_VERSIONS + MODERN_VERSIONS
# 2025-06-18+ transports: with no MCP-Protocol-Version header and no other
# way to tell (no negotiated session version), assume 2025-03-26.
DEFAULT_VERSION: Final = V2025_03_26

# Request metadata (header names lower-case; compare case-insensitively).
PROTOCOL_VERSION_HEADER: Final = "mcp-protocol-version"
SESSION_ID_HEADER: Final = "mcp-session-id"
METHOD_HEADER: Final = "mcp-method"
NAME_HEADER: Final = "mcp-name"
# 2026-07-28 basic/index "_meta" reserved keys; streamable-http "Protocol
# Version Header": the header MUST match this _meta field.
META_PROTOCOL_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
_BASE64_PREFIX, _BASE64_SUFFIX = "=?base64?", "?="
# Mcp-Name is required for these (2026-07-28 "Standard Request Headers").
_NAME_SOURCE: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

# -- error codes ------------------------------------------------------------------

# Defined by MCP 2026-07-28 (the -32020..-32099 sub-range is MCP's own).
HEADER_MISMATCH: Final = -32020
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022
# Our own codes. MCP 2026-07-28 reserves -32020..-32099 for codes it defines,
# tells new implementations not to use -32000..-32019 (legacy, meaningless),
# and asks new codes to sit outside the JSON-RPC reserved -32768..-32000. So
# these are just outside it, mnemonic for the HTTP statuses they stand for.
POLICY_DENIED: Final = -31403
RATE_LIMITED: Final = -31429

DENIAL_HTTP_STATUS: Final = 200  # see the module docstring
HEADER_MISMATCH_HTTP_STATUS: Final = 400

# list method -> (result array member, identifying member of each item)
LIST_METHODS: Final[Mapping[str, tuple[str, str]]] = {
    "tools/list": ("tools", "name"),
    "prompts/list": ("prompts", "name"),
    "resources/list": ("resources", "uri"),
}

# (list method, item name or uri) -> may the caller see it?
ListPolicy = Callable[[str, str], bool]


class UnsupportedVersion(JsonRpcError):
    """A protocol version we do not know; answer 400 (2026: -32022)."""

    def __init__(self, requested: str, id: JsonRpcId | None = None) -> None:
        super().__init__(
            UNSUPPORTED_PROTOCOL_VERSION,
            "Unsupported protocol version",
            id,
            {"supported": list(KNOWN_VERSIONS), "requested": requested[:64]},
        )


class UnfilterableResponse(JsonRpcError):
    """A response that may carry a list we must filter, but that we cannot
    parse strictly (e.g. duplicate keys): passing it on could show a lenient
    client the unfiltered list, so the caller drops it (502 / close the stream)."""

    def __init__(self, why: str) -> None:
        super().__init__(INVALID_REQUEST, f"unfilterable upstream response: {why}", http_status=502)


def is_2026(version: str) -> bool:
    """The stateless generation (2026-07-28)."""
    return version in MODERN_VERSIONS


def batches_allowed(version: str) -> bool:
    """JSON-RPC batches: added in 2025-03-26, removed in 2025-06-18."""
    return version == V2025_03_26


def supports_cache_scope(version: str) -> bool:
    """SEP-2549 caching hints (``ttlMs``, ``cacheScope``: "public"/"private")
    are part of 2026-07-28 list results; earlier revisions have no such field."""
    return is_2026(version)


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # The caller passes one value per name; a repeated header must already be
    # refused or joined (a joined "a, b" never matches a body value: fails closed).
    return {name.lower(): value for name, value in headers.items()}


def _meta_version(message: JsonRpcMessage) -> str | None:
    params = message.params
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, dict) or META_PROTOCOL_VERSION not in meta:
        return None
    value = meta[META_PROTOCOL_VERSION]
    if not isinstance(value, str):
        raise JsonRpcError(
            INVALID_PARAMS,
            f"Invalid params: _meta {META_PROTOCOL_VERSION} must be a string",
            message.id,
        )
    return value


def _known(version: str, msg_id: JsonRpcId | None = None) -> str:
    if version not in KNOWN_VERSIONS:
        raise UnsupportedVersion(version, msg_id)
    return version


def detect_version(
    headers: Mapping[str, str],
    message: JsonRpcMessage | ParsedBody | None,
    session_version: str | None,
) -> str:
    """The MCP version a request speaks; raises JsonRpcError (HTTP 400).

    In order: the request's ``_meta`` version (2026-07-28; must equal the
    ``MCP-Protocol-Version`` header when both are there: -32020 otherwise);
    the header (2025-06-18+; must equal the session's negotiated version
    when there is one); an ``initialize`` request's ``params.protocolVersion``;
    the session's negotiated version; else 2025-03-26, as the spec says.
    ``message`` is None for a GET.
    """
    lower = _lower_headers(headers)
    header = lower.get(PROTOCOL_VERSION_HEADER)
    messages: tuple[JsonRpcMessage, ...] = ()
    if isinstance(message, ParsedBody):
        messages = message.messages
    elif message is not None:
        messages = (message,)
    first_id = messages[0].id if len(messages) == 1 else None

    metas = [(m, v) for m in messages if (v := _meta_version(m)) is not None]
    if metas:
        if len(messages) != 1:
            raise JsonRpcError(INVALID_REQUEST, "2026-07-28 requests cannot be batched")
        meta = metas[0][1]
        if header is not None and header.strip() != meta:
            raise JsonRpcError(
                HEADER_MISMATCH,
                "Header mismatch: MCP-Protocol-Version does not match "
                f"_meta {META_PROTOCOL_VERSION}",
                first_id,
            )
        return _known(meta, first_id)
    if header is not None:
        version = _known(header.strip(), first_id)
        if session_version is not None and version != session_version:
            # The server answers by the header; a header that disagrees with the
            # negotiated version could buy older rules (batches), so refuse it.
            raise JsonRpcError(
                INVALID_REQUEST,
                "MCP-Protocol-Version does not match the session's negotiated version",
                first_id,
            )
        return version
    if len(messages) == 1 and messages[0].method == "initialize":
        params = messages[0].params
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        if isinstance(requested, str) and requested in LEGACY_VERSIONS:
            return requested
        # A server may negotiate down from a version it does not know; the
        # session's version comes from the initialize *result* anyway.
        return DEFAULT_VERSION
    if session_version is not None:
        return _known(session_version)
    return DEFAULT_VERSION


def negotiated_version(response: JsonRpcMessage | Mapping[str, Any]) -> str | None:
    """The ``protocolVersion`` of an initialize result, for the session, or None."""
    raw = response.raw if isinstance(response, JsonRpcMessage) else response
    result = raw.get("result")
    if isinstance(result, dict):
        version = result.get("protocolVersion")
        if isinstance(version, str):
            return version
    return None


# -- calls ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class McpCall:
    """One JSON-RPC message of a client's POST, with what policy decides on."""

    kind: MessageKind
    method: str | None  # None for a response the client sends (legacy only)
    id: JsonRpcId | None
    version: str
    message: JsonRpcMessage
    tool: str | None = None  # tools/call params.name
    arguments: dict[str, Any] = field(default_factory=dict)  # tools/call, prompts/get
    resource_uri: str | None = None  # resources/read, subscribe, unsubscribe
    prompt_name: str | None = None  # prompts/get params.name
    session_id: str | None = None  # Mcp-Session-Id (legacy only; 2026 ignores it)

    @property
    def is_notification(self) -> bool:
        return self.kind is MessageKind.NOTIFICATION

    @property
    def id_key(self) -> IdKey | None:
        return None if self.id is None else id_key(self.id)

    @property
    def params(self) -> dict[str, Any]:
        params = self.message.params
        return params if isinstance(params, dict) else {}


def _param_str(message: JsonRpcMessage, name: str) -> str:
    params = message.params
    value = params.get(name) if isinstance(params, dict) else None
    if not isinstance(value, str):
        raise JsonRpcError(
            INVALID_PARAMS,
            f"Invalid params: {message.method} needs a string params.{name}",
            message.id,
        )
    return value


def _param_object(message: JsonRpcMessage, name: str) -> dict[str, Any]:
    params = message.params
    if not isinstance(params, dict) or name not in params:
        return {}
    value = params[name]
    if not isinstance(value, dict):
        raise JsonRpcError(
            INVALID_PARAMS, f"Invalid params: params.{name} must be an object", message.id
        )
    return value


def _call(message: JsonRpcMessage, version: str, session_id: str | None) -> McpCall:
    method = message.method
    if method is not None and message.params is not None and not isinstance(message.params, dict):
        # MCP params are always an object; positional params mean nothing here.
        raise JsonRpcError(INVALID_PARAMS, "Invalid params: params must be an object", message.id)
    call = McpCall(message.kind, method, message.id, version, message, session_id=session_id)
    if method == "tools/call":
        return replace(
            call, tool=_param_str(message, "name"), arguments=_param_object(message, "arguments")
        )
    if method == "prompts/get":
        return replace(
            call,
            prompt_name=_param_str(message, "name"),
            arguments=_param_object(message, "arguments"),
        )
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        return replace(call, resource_uri=_param_str(message, "uri"))
    return call


def extract_calls(
    parsed: ParsedBody, headers: Mapping[str, str], session_version: str | None
) -> list[McpCall]:
    """The calls in a client's POST body (a batch gives several); raises JsonRpcError.

    Refused here: a batch outside 2025-03-26, ``initialize`` inside a batch,
    a response from the client in 2026-07-28 (which forbids them), and
    tools/call, prompts/get or resources/read without their string target.
    """
    version = detect_version(headers, parsed, session_version)
    if parsed.is_batch:
        if not batches_allowed(version):
            raise JsonRpcError(
                INVALID_REQUEST, f"JSON-RPC batches are not allowed in MCP {version}"
            )
        if any(m.method == "initialize" for m in parsed.messages):
            raise JsonRpcError(INVALID_REQUEST, "initialize must not be part of a batch")
    modern = is_2026(version)
    session_id = None if modern else _lower_headers(headers).get(SESSION_ID_HEADER)
    calls = []
    for message in parsed.messages:
        if modern and message.is_response:
            raise JsonRpcError(INVALID_REQUEST, "clients must not send responses in 2026-07-28")
        calls.append(_call(message, version, session_id))
    return calls


def pending_list_requests(calls: list[McpCall]) -> dict[IdKey, str]:
    """id key -> method for the list requests among ``calls`` (to filter their answers)."""
    pending: dict[IdKey, str] = {}
    for call in calls:
        key = call.id_key
        if call.method is not None and call.method in LIST_METHODS and key is not None:
            pending[key] = call.method
    return pending


# -- mirrored headers (2026-07-28) --------------------------------------------------

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
    lower = _lower_headers(headers)
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


# -- denials in MCP terms ---------------------------------------------------------------

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


def unsupported_version(id: JsonRpcId | None, requested: str) -> bytes:
    return UnsupportedVersion(requested, id).to_bytes()


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
