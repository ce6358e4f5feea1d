"""Strict JSON-RPC parsing: what is refused, what is kept exactly (ids, order)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from proxy.agent.jsonrpc import (
    INVALID_REQUEST,
    MAX_DEPTH,
    PARSE_ERROR,
    BodyTooLarge,
    JsonRpcError,
    MessageKind,
    args_sha256,
    canonical_json,
    decode_json,
    error_response,
    id_key,
    parse_message,
    result_response,
)

CAP = 1 << 16


def parse(body: bytes, *, allow_batch: bool = False) -> Any:
    return parse_message(body, max_bytes=CAP, allow_batch=allow_batch)


KINDS = [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', MessageKind.REQUEST, 1, "tools/list"),
    (b'{"jsonrpc":"2.0","id":"1","method":"ping"}', MessageKind.REQUEST, "1", "ping"),
    (b'{"jsonrpc":"2.0","id":-7,"method":"ping","params":{}}', MessageKind.REQUEST, -7, "ping"),
    (b'{"jsonrpc":"2.0","id":"","method":"ping","params":[]}', MessageKind.REQUEST, "", "ping"),
    (b'{"jsonrpc":"2.0","method":"notifications/initialized"}', MessageKind.NOTIFICATION, None,
     "notifications/initialized"),
    (b'{"jsonrpc":"2.0","id":3,"result":{}}', MessageKind.RESULT, 3, None),
    (b'{"jsonrpc":"2.0","id":3,"result":null}', MessageKind.RESULT, 3, None),
    (b'{"jsonrpc":"2.0","id":"x","error":{"code":-32601,"message":"no"}}', MessageKind.ERROR, "x",
     None),
    (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad","data":[1]}}',
     MessageKind.ERROR, None, None),
    (b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"bad"}}', MessageKind.ERROR, None, None),
]  # fmt: skip


@pytest.mark.parametrize(("body", "kind", "msg_id", "method"), KINDS)
def test_kinds(body: bytes, kind: MessageKind, msg_id: object, method: str | None) -> None:
    parsed = parse(body)
    assert not parsed.is_batch
    message = parsed.single
    assert message is not None
    assert message.kind is kind
    assert message.id == msg_id and type(message.id) is type(msg_id)
    assert message.method == method


REFUSED = [
    # (body, code, why)
    (b"", PARSE_ERROR, "empty"),
    (b"{", PARSE_ERROR, "truncated"),
    (b"\xff\xfe{}", PARSE_ERROR, "not UTF-8"),
    (b'{"jsonrpc":"2.0","id":1,"method":"\xc3"}', PARSE_ERROR, "truncated UTF-8 sequence"),
    (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"x"}', PARSE_ERROR, "byte-order mark"),
    (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"x"}', PARSE_ERROR, "duplicate top-level key"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}',
     PARSE_ERROR, "duplicate key in params"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":[{"b":{"c":1,"c":2}}]}}', PARSE_ERROR,
     "duplicate key deep in arrays"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"n":NaN}}', PARSE_ERROR, "NaN"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"n":-Infinity}}', PARSE_ERROR, "Infinity"),
    (b'{"jsonrpc":"2.0","id":1,"method":"\\ud800"}', PARSE_ERROR, "lone surrogate value"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"\\udc00":1}}', PARSE_ERROR,
     "lone surrogate key"),
    (b"[]", INVALID_REQUEST, "batch refused"),
    (b"1", INVALID_REQUEST, "not an object"),
    (b'"x"', INVALID_REQUEST, "a string"),
    (b"null", INVALID_REQUEST, "null"),
    (b'{"id":1,"method":"x"}', INVALID_REQUEST, "no jsonrpc member"),
    (b'{"jsonrpc":"1.0","id":1,"method":"x"}', INVALID_REQUEST, "wrong version"),
    (b'{"jsonrpc":2.0,"id":1,"method":"x"}', INVALID_REQUEST, "version as a number"),
    (b'{"jsonrpc":"2.0","id":1,"method":5}', INVALID_REQUEST, "method not a string"),
    (b'{"jsonrpc":"2.0","id":null,"method":"x"}', INVALID_REQUEST, "null id on a request"),
    (b'{"jsonrpc":"2.0","id":true,"method":"x"}', INVALID_REQUEST, "bool id"),
    (b'{"jsonrpc":"2.0","id":1.0,"method":"x"}', INVALID_REQUEST, "float id"),
    (b'{"jsonrpc":"2.0","id":1e2,"method":"x"}', INVALID_REQUEST, "exponent id"),
    (b'{"jsonrpc":"2.0","id":{},"method":"x"}', INVALID_REQUEST, "object id"),
    (b'{"jsonrpc":"2.0","id":[1],"method":"x"}', INVALID_REQUEST, "array id"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":"a"}', INVALID_REQUEST, "string params"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","result":1}', INVALID_REQUEST, "method and result"),
    (b'{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"m"}}', INVALID_REQUEST,
     "result and error"),
    (b'{"jsonrpc":"2.0","id":1}', INVALID_REQUEST, "neither"),
    (b'{"jsonrpc":"2.0","result":1}', INVALID_REQUEST, "result without id"),
    (b'{"jsonrpc":"2.0","id":null,"result":1}', INVALID_REQUEST, "result with null id"),
    (b'{"jsonrpc":"2.0","id":1,"error":"boom"}', INVALID_REQUEST, "error not an object"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}', INVALID_REQUEST,
     "string code"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":true,"message":"m"}}', INVALID_REQUEST,
     "bool code"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":1}}', INVALID_REQUEST, "no message"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "code", "why"), REFUSED, ids=[r[2] for r in REFUSED])
def test_refused(body: bytes, code: int, why: str) -> None:
    with pytest.raises(JsonRpcError) as info:
        parse(body)
    assert info.value.code == code, why
    assert info.value.http_status == 400


def test_error_keeps_a_readable_id() -> None:
    with pytest.raises(JsonRpcError) as info:
        parse(b'{"jsonrpc":"1.0","id":"abc","method":"x"}')
    assert info.value.id == "abc"
    body = json.loads(info.value.to_bytes())
    assert body == {"jsonrpc": "2.0", "id": "abc", "error": {"code": -32600, "message": body[
        "error"]["message"]}}  # fmt: skip
    with pytest.raises(JsonRpcError) as info:
        parse(b'{"jsonrpc":"1.0","id":true,"method":"x"}')
    assert info.value.id is None  # true is not an id we can answer


def test_nesting_limit() -> None:
    ok = b'{"jsonrpc":"2.0","id":1,"method":"x","params":' + b"[" * (MAX_DEPTH - 1)
    ok += b"]" * (MAX_DEPTH - 1) + b"}"
    parse(ok)
    deep = b'{"jsonrpc":"2.0","id":1,"method":"x","params":' + b"[" * MAX_DEPTH
    deep += b"]" * MAX_DEPTH + b"}"
    with pytest.raises(JsonRpcError) as info:
        parse(deep)
    assert info.value.code == PARSE_ERROR
    # Far past Python's recursion limit: still a clean parse error.
    hostile = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(JsonRpcError):
        decode_json(hostile, max_bytes=1 << 20)


def test_size_cap() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    parse_message(body, max_bytes=len(body), allow_batch=False)
    with pytest.raises(BodyTooLarge) as info:
        parse_message(body, max_bytes=len(body) - 1, allow_batch=False)
    assert info.value.http_status == 413
    assert info.value.code == INVALID_REQUEST


BATCH = (
    b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"},'
    b'{"jsonrpc":"2.0","method":"notifications/x"},'
    b'{"jsonrpc":"2.0","id":"1","result":{}}]'
)


def test_batch_allowed() -> None:
    parsed = parse(BATCH, allow_batch=True)
    assert parsed.is_batch and parsed.single is None
    assert [m.kind for m in parsed.messages] == [
        MessageKind.REQUEST,
        MessageKind.NOTIFICATION,
        MessageKind.RESULT,
    ]
    assert parsed.messages[0].id_key != parsed.messages[2].id_key  # 1 and "1"


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"[1]",
        b'[{"jsonrpc":"2.0","id":1,"method":"x"},[]]',
        b'[{"jsonrpc":"2.0","id":1,"method":"x"},{"jsonrpc":"2.0","id":1.5,"method":"x"}]',
    ],
)
def test_bad_batches(body: bytes) -> None:
    with pytest.raises(JsonRpcError) as info:
        parse(body, allow_batch=True)
    assert info.value.code == INVALID_REQUEST


def test_batch_refused_when_not_allowed() -> None:
    with pytest.raises(JsonRpcError) as info:
        parse(BATCH)
    assert info.value.code == INVALID_REQUEST
    assert "batch" in info.value.message


def test_id_keys_keep_type() -> None:
    assert id_key(1) == ("n", 1)
    assert id_key("1") == ("s", "1")
    assert len({id_key(1), id_key("1")}) == 2
    for bad in (True, 1.0, None):
        with pytest.raises(TypeError):
            id_key(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("msg_id", [1, "1", 0, "", -3, 2**70, None])
def test_serialisers_keep_id_type(msg_id: Any) -> None:
    err = json.loads(error_response(msg_id, -32602, "Unknown tool: x"))
    assert err == {
        "jsonrpc": "2.0",
        "id": msg_id,
        "error": {"code": -32602, "message": "Unknown tool: x"},
    }
    assert type(err["id"]) is type(msg_id)
    if msg_id is not None:
        res = json.loads(result_response(msg_id, {"a": 1}))
        assert res["id"] == msg_id and type(res["id"]) is type(msg_id)


def test_error_response_bytes() -> None:
    assert error_response("7", -32001, "nope", {"retry_after": 2}) == (
        b'{"jsonrpc":"2.0","id":"7","error":{"code":-32001,"message":"nope","data":{"retry_after":2}}}'
    )
    assert (
        result_response(7, {"b": 1, "a": "é"})
        == '{"jsonrpc":"2.0","id":7,"result":{"b":1,"a":"é"}}'.encode()
    )


def test_canonical_json_and_hash() -> None:
    a = {"b": [1, {"z": 1, "y": "é"}], "a": None}
    b = json.loads('{"a":null,"b":[1,{"y":"é","z":1}]}')
    assert canonical_json(a) == canonical_json(b) == '{"a":null,"b":[1,{"y":"é","z":1}]}'.encode()
    assert args_sha256(a) == hashlib.sha256(canonical_json(a)).hexdigest() == args_sha256(b)
    assert args_sha256({"x": 1}) != args_sha256({"x": "1"})
    with pytest.raises(ValueError):
        canonical_json({"n": float("nan")})
