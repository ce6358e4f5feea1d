"""Strict JSON-RPC 2.0 parsing and serialisation for MCP and A2A (pure).

Theory of operation: the sidecar makes policy decisions on what a JSON-RPC
body *says*, and the upstream acts on what *it* parses out of the same
bytes. Every place where two parsers could read one body differently is a
way around the policy, so :func:`parse_message` refuses those bodies instead
of guessing:

- duplicate object keys, at any depth (Python keeps the last value, other
  parsers keep the first: ``{"name": "read", "name": "delete"}``);
- invalid UTF-8, a byte-order mark, lone UTF-16 surrogates (``"\\ud800"``),
  ``NaN``/``Infinity``, nesting deeper than :data:`MAX_DEPTH`;
- ids that are not a string or an integer (``true`` is not ``1``, ``1.0``
  is not ``1``; MCP and A2A both define ids as string or integer, and MCP
  forbids ``null`` on requests).

An id keeps its JSON type end to end: ``1`` and ``"1"`` are different
requests, so :func:`id_key` tags each id with its type before it is used as
a dictionary key, and the serialisers write back exactly the value they
were given.

Errors are :class:`JsonRpcError` values carrying the standard code, the id
(when one could be read) and the HTTP status a caller should use; they turn
into response bytes with :meth:`JsonRpcError.to_bytes`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from proxy.policy.canonical import canonical_json

JsonRpcId: TypeAlias = str | int
# (type tag, value): ("s", "1") and ("n", 1) never collide as dictionary keys.
IdKey: TypeAlias = tuple[str, str | int]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602

JSONRPC_VERSION: Final = "2.0"
# Deep enough for real tool schemas; shallow enough that re-serialising a
# body we accepted can never hit Python's recursion limit.
MAX_DEPTH: Final = 128


class JsonRpcError(Exception):
    """A JSON-RPC error to answer with (the peer sent something we refuse).

    ``http_status`` is the status a caller should use when this error is the
    whole HTTP response (a body we could not parse at all is a 400).
    """

    def __init__(
        self,
        code: int,
        message: str,
        id: JsonRpcId | None = None,
        data: Any = None,
        *,
        http_status: int = 400,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.data = data
        self.http_status = http_status

    def to_bytes(self) -> bytes:
        return error_response(self.id, self.code, self.message, self.data)

    def __repr__(self) -> str:
        return f"JsonRpcError({self.code}, {self.message!r}, id={self.id!r})"


class BodyTooLarge(JsonRpcError):
    """The body is over the size cap (a caller answers 413)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            INVALID_REQUEST, f"body of {size} bytes is over the {limit}-byte limit", http_status=413
        )


class MessageKind(enum.Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESULT = "result"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class JsonRpcMessage:
    """One validated JSON-RPC message; ``raw`` is the decoded object."""

    kind: MessageKind
    raw: dict[str, Any]
    id: JsonRpcId | None  # None: a notification, or an error answering no readable id
    method: str | None = None
    params: dict[str, Any] | list[Any] | None = None

    @property
    def is_notification(self) -> bool:
        return self.kind is MessageKind.NOTIFICATION

    @property
    def is_response(self) -> bool:
        return self.kind in (MessageKind.RESULT, MessageKind.ERROR)

    @property
    def id_key(self) -> IdKey | None:
        return None if self.id is None else id_key(self.id)

    @property
    def result(self) -> Any:
        return self.raw.get("result")


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """A body: one message, or a batch (a JSON array) of them."""

    messages: tuple[JsonRpcMessage, ...]
    is_batch: bool

    @property
    def single(self) -> JsonRpcMessage | None:
        return None if self.is_batch else self.messages[0]


def id_key(value: JsonRpcId) -> IdKey:
    """A dictionary key for an id that keeps its JSON type (1 is not "1")."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"not a JSON-RPC id: {value!r}")
    return ("s", value) if isinstance(value, str) else ("n", value)


# -- decoding ---------------------------------------------------------------


class _Refused(ValueError):
    """Valid-looking JSON we refuse to interpret (duplicate key, NaN, ...)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)  # in C; a duplicate shows as a shorter dict
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key {key[:64]!r}")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON grammar but overflows to inf, which no later step
    # (canonical hashing, re-encoding) can represent: refuse it here.
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _Refused(f"number {text[:40]} is out of range")
    return value


# Only \uXXXX escapes can produce these; they cannot be encoded as UTF-8 and
# other parsers replace or reject them, so the meaning is ambiguous.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


# A lone surrogate can only come from a \uD800-\uDFFF escape (the text itself
# decoded from UTF-8), and nesting can only be as deep as the brackets in the
# text. Most bodies have neither: the walk over the parsed tree is skipped.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _may_fail_tree_checks(text: str) -> bool:
    return (
        text.count("{") + text.count("[") > MAX_DEPTH or _SURROGATE_ESCAPE.search(text) is not None
    )


def _check_tree(value: Any) -> None:
    """Depth and string checks, iteratively (no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                raise _Refused("lone UTF-16 surrogate in a string")
        elif isinstance(item, dict):
            if depth > MAX_DEPTH:
                raise _Refused(f"nesting deeper than {MAX_DEPTH}")
            for key, child in item.items():
                if _has_surrogate(key):
                    raise _Refused("lone UTF-16 surrogate in a key")
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                raise _Refused(f"nesting deeper than {MAX_DEPTH}")
            stack.extend((child, depth + 1) for child in item)


# Built once: json.loads and json.dumps with options build a new decoder or
# encoder on every call, which costs more than parsing a small message.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite_float
)
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
# json.decoder.WHITESPACE; it matches everywhere (possibly empty), never None.
_SPACE: Callable[[str, int], re.Match[str]] = re.compile(r"[ \t\n\r]*").match  # type: ignore[assignment]


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``, the same errors and messages, without its
    two Python-level calls (decode, raw_decode) per body."""
    try:
        value, end = _SCAN(text, _SPACE(text, 0).end())
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    end = _SPACE(text, end).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def decode_json(body: bytes | str, *, max_bytes: int) -> Any:
    """Strictly decode one JSON text (no JSON-RPC rules); raises JsonRpcError.

    Too large: :class:`BodyTooLarge`. Anything else wrong: ``-32700``.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if len(raw) > max_bytes:
        raise BodyTooLarge(len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRpcError(PARSE_ERROR, f"Parse error: invalid UTF-8 at byte {exc.start}") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _decode(text)
        if _may_fail_tree_checks(text):
            _check_tree(value)
    except _Refused as exc:
        raise JsonRpcError(PARSE_ERROR, f"Parse error: {exc}") from None
    except RecursionError:
        raise JsonRpcError(PARSE_ERROR, "Parse error: nesting too deep") from None
    except ValueError as exc:  # json.JSONDecodeError, including a leading BOM
        raise JsonRpcError(PARSE_ERROR, f"Parse error: {exc}") from None
    return value


def is_json(text: str) -> bool:
    """True if Python's permissive parser reads ``text`` as JSON at all.

    Used to tell "not JSON" (nothing any client will act on) from "JSON we
    refuse" (something a lenient client might still act on).
    """
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# -- message validation -------------------------------------------------------


def _readable_id(obj: dict[str, Any]) -> JsonRpcId | None:
    """The id to answer an invalid message with, if it is a usable id."""
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value


def _invalid(obj: dict[str, Any] | None, why: str) -> JsonRpcError:
    return JsonRpcError(
        INVALID_REQUEST, f"Invalid Request: {why}", None if obj is None else _readable_id(obj)
    )


def _check_id(obj: dict[str, Any], *, allow_null: bool) -> JsonRpcId | None:
    value = obj["id"]
    if value is None:
        if allow_null:
            return None
        raise _invalid(obj, "id must not be null")
    if isinstance(value, bool | float) or not isinstance(value, str | int):
        raise _invalid(obj, "id must be a string or an integer")
    return value


def validate_message(obj: Any) -> JsonRpcMessage:
    """Classify one decoded JSON value as a JSON-RPC message, or raise -32600."""
    if not isinstance(obj, dict):
        raise _invalid(None, "a message must be a JSON object")
    version = obj.get("jsonrpc")
    if version != JSONRPC_VERSION or not isinstance(version, str):
        raise _invalid(obj, 'jsonrpc must be "2.0"')
    has_result, has_error = "result" in obj, "error" in obj
    if "method" in obj:
        if has_result or has_error:
            raise _invalid(obj, "a request cannot carry result or error")
        method = obj["method"]
        if not isinstance(method, str):
            raise _invalid(obj, "method must be a string")
        params = obj.get("params")
        if "params" in obj and not isinstance(params, dict | list):
            raise _invalid(obj, "params must be an object or an array")
        if "id" not in obj:
            return JsonRpcMessage(MessageKind.NOTIFICATION, obj, None, method, params)
        msg_id = obj["id"]
        kind = type(msg_id)  # exactly str or int (not bool) passes; _check_id judges the rest
        if kind is not str and kind is not int:
            msg_id = _check_id(obj, allow_null=False)
        return JsonRpcMessage(MessageKind.REQUEST, obj, msg_id, method, params)
    if has_result == has_error:
        raise _invalid(obj, "a message needs a method, or exactly one of result and error")
    if has_result:
        if "id" not in obj:
            raise _invalid(obj, "a result response needs an id")
        return JsonRpcMessage(MessageKind.RESULT, obj, _check_id(obj, allow_null=False))
    error = obj["error"]
    if not isinstance(error, dict):
        raise _invalid(obj, "error must be an object")
    code = error.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        raise _invalid(obj, "error.code must be an integer")
    if not isinstance(error.get("message"), str):
        raise _invalid(obj, "error.message must be a string")
    # An error may answer a request whose id could not be read: null or absent.
    msg_id = _check_id(obj, allow_null=True) if "id" in obj else None
    return JsonRpcMessage(MessageKind.ERROR, obj, msg_id)


def parse_message(body: bytes | str, *, max_bytes: int, allow_batch: bool) -> ParsedBody:
    """Parse a JSON-RPC body strictly; raises :class:`JsonRpcError`.

    A batch is a non-empty array of message objects and is accepted only
    when ``allow_batch`` (MCP allowed batches in 2025-03-26 only). One bad
    element refuses the whole batch: a proxy must not forward half of it.
    """
    value = decode_json(body, max_bytes=max_bytes)
    if isinstance(value, list):
        if not allow_batch:
            raise _invalid(None, "JSON-RPC batches are not allowed here")
        if not value:
            raise _invalid(None, "an empty batch")
        return ParsedBody(tuple(validate_message(item) for item in value), is_batch=True)
    return ParsedBody((validate_message(value),), False)  # positional: a keyword costs 0.1 us


# -- encoding -------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    """Compact JSON, keys in their existing order, UTF-8 (not ASCII-escaped)."""
    return _COMPACT.encode(value).encode("utf-8")


def error_response(
    id: JsonRpcId | None,
    code: int,
    message: str,
    data: Any = None,
) -> bytes:
    """An error response; the id is written back with its JSON type.

    ``data`` of None is left out (JSON-RPC makes ``data`` optional).
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "error": error})


def result_response(id: JsonRpcId, result: Any) -> bytes:
    return dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "result": result})


def args_sha256(arguments: Any) -> str:
    """Hex SHA-256 of the canonical JSON of tool arguments (for audit records)."""
    return hashlib.sha256(canonical_json(arguments)).hexdigest()
