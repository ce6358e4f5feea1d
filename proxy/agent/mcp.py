"""MCP over Streamable HTTP: versions and calls (pure); mirrored header
checks are :mod:`proxy.agent.mcp_headers`'s, denials and list filtering
:mod:`proxy.agent.mcp_answers`'s.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.agent.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    IdKey,
    JsonRpcError,
    JsonRpcId,
    JsonRpcMessage,
    MessageKind,
    ParsedBody,
    id_key,
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


class LowerHeaders(dict[str, str]):
    """Request headers with lower-cased names, as :func:`lower_headers`
    made them: every later check reads them as they are."""


def lower_headers(headers: Mapping[str, str]) -> LowerHeaders:
    """Names lower-cased, once per request (a LowerHeaders comes back as is).

    The caller passes one value per name; a repeated header must already be
    refused or joined (a joined "a, b" never matches a body value: fails closed).
    """
    if isinstance(headers, LowerHeaders):
        return headers
    return LowerHeaders({name.lower(): value for name, value in headers.items()})


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
    messages: tuple[JsonRpcMessage, ...] = ()
    if isinstance(message, ParsedBody):
        messages = message.messages
    elif message is not None:
        messages = (message,)
    return _detect(lower_headers(headers), messages, session_version)


def _detect(
    lower: LowerHeaders, messages: tuple[JsonRpcMessage, ...], session_version: str | None
) -> str:
    header = lower.get(PROTOCOL_VERSION_HEADER)
    single = len(messages) == 1
    first_id = messages[0].id if single else None
    if single:
        meta = _meta_version(messages[0])
    else:
        # Every message's _meta is read (one may be malformed) before a batch
        # carrying any is refused.
        metas = [v for m in messages if (v := _meta_version(m)) is not None]
        if metas:
            raise JsonRpcError(INVALID_REQUEST, "2026-07-28 requests cannot be batched")
        meta = None
    if meta is not None:
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
    if single and messages[0].method == "initialize":
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
    # One McpCall with its targets (a dataclasses.replace per call cost more
    # than the rest of this function).
    tool = resource_uri = prompt_name = None
    arguments: dict[str, Any] = {}
    if method == "tools/call":
        tool = _param_str(message, "name")
        arguments = _param_object(message, "arguments")
    elif method == "prompts/get":
        prompt_name = _param_str(message, "name")
        arguments = _param_object(message, "arguments")
    elif method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        resource_uri = _param_str(message, "uri")
    # Positional: keywords cost a third more in a frozen dataclass's __init__.
    return McpCall(
        message.kind,
        method,
        message.id,
        version,
        message,
        tool,
        arguments,
        resource_uri,
        prompt_name,
        session_id,
    )


def extract_calls(
    parsed: ParsedBody, headers: Mapping[str, str], session_version: str | None
) -> list[McpCall]:
    """The calls in a client's POST body (a batch gives several); raises JsonRpcError.

    Refused here: a batch outside 2025-03-26, ``initialize`` inside a batch,
    a response from the client in 2026-07-28 (which forbids them), and
    tools/call, prompts/get or resources/read without their string target.
    """
    lower = lower_headers(headers)
    version = _detect(lower, parsed.messages, session_version)
    if parsed.is_batch:
        if not batches_allowed(version):
            raise JsonRpcError(
                INVALID_REQUEST, f"JSON-RPC batches are not allowed in MCP {version}"
            )
        if any(m.method == "initialize" for m in parsed.messages):
            raise JsonRpcError(INVALID_REQUEST, "initialize must not be part of a batch")
    modern = version in MODERN_VERSIONS  # is_2026
    session_id = None if modern else lower.get(SESSION_ID_HEADER)
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
        method = call.method
        if method is not None and method in LIST_METHODS and call.id is not None:
            pending[id_key(call.id)] = method
    return pending
