"""Agent protocols over HTTP: MCP and A2A (pure: no sockets, no trio, no I/O).

- :mod:`proxy.agent.jsonrpc`: strict JSON-RPC 2.0 parsing and serialisation.
- :mod:`proxy.agent.mcp`: MCP Streamable HTTP versions, calls, mirrored
  header checks, denials in MCP terms, list filtering.
- :mod:`proxy.agent.sse`: incremental SSE filtering (list responses in streams).
- :mod:`proxy.agent.a2a`: A2A method names, task ownership, push URL
  allowlist, agent cards.
"""

from proxy.agent.jsonrpc import (
    BodyTooLarge,
    IdKey,
    JsonRpcError,
    JsonRpcId,
    JsonRpcMessage,
    MessageKind,
    ParsedBody,
    args_sha256,
    error_response,
    id_key,
    parse_message,
    result_response,
)
from proxy.policy.canonical import canonical_json

__all__ = [
    "BodyTooLarge",
    "IdKey",
    "JsonRpcError",
    "JsonRpcId",
    "JsonRpcMessage",
    "MessageKind",
    "ParsedBody",
    "args_sha256",
    "canonical_json",
    "error_response",
    "id_key",
    "parse_message",
    "result_response",
]
