"""MCP: version detection, calls, mirrored headers, denials, list filtering."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.agent import mcp, mcp_answers, mcp_headers
from proxy.agent.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    JsonRpcError,
    MessageKind,
    ParsedBody,
    id_key,
    parse_message,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mcp"
META = mcp.META_PROTOCOL_VERSION


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def body(obj: Any, *, batch: bool = True) -> ParsedBody:
    return parse_message(json.dumps(obj).encode(), max_bytes=1 << 20, allow_batch=batch)


def req(method: str, params: dict[str, Any] | None = None, msg_id: Any = 1) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if msg_id is not None:
        out["id"] = msg_id
    if params is not None:
        out["params"] = params
    return out


def modern(method: str, params: dict[str, Any] | None = None, msg_id: Any = 1) -> dict[str, Any]:
    params = dict(params or {})
    params["_meta"] = {META: "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    return req(method, params, msg_id)


# -- version detection ---------------------------------------------------------------

DETECT = [
    # (headers, message, session version, expected)
    ({}, req("tools/list"), None, "2025-03-26"),  # nothing at all: the spec's default
    ({"MCP-Protocol-Version": "2025-06-18"}, req("tools/list"), None, "2025-06-18"),
    ({"mcp-protocol-version": "2025-11-25"}, req("tools/list"), "2025-11-25", "2025-11-25"),
    ({}, req("tools/list"), "2025-06-18", "2025-06-18"),  # the negotiated session version
    ({}, req("initialize", {"protocolVersion": "2025-11-25"}), None, "2025-11-25"),
    ({}, req("initialize", {"protocolVersion": "2024-11-05"}), None, "2025-03-26"),
    ({}, req("initialize", {"protocolVersion": "2099-01-01"}), None, "2025-03-26"),
    ({}, modern("tools/list"), None, "2026-07-28"),
    ({"MCP-Protocol-Version": "2026-07-28"}, modern("tools/list"), None, "2026-07-28"),
    ({"MCP-Protocol-Version": "2026-07-28"}, modern("tools/list"), "2025-11-25", "2026-07-28"),
    ({"MCP-Protocol-Version": "2026-07-28"}, req("tools/list"), None, "2026-07-28"),
    ({}, None, "2025-11-25", "2025-11-25"),  # a GET in a session
    ({}, None, None, "2025-03-26"),
]


@pytest.mark.parametrize(("headers", "message", "session", "expected"), DETECT)
def test_detect_version(
    headers: dict[str, str], message: Any, session: str | None, expected: str
) -> None:
    parsed = None if message is None else body(message).single
    assert mcp.detect_version(headers, parsed, session) == expected


DETECT_ERRORS = [
    ({"MCP-Protocol-Version": "1900-01-01"}, req("tools/list"), None,
     mcp.UNSUPPORTED_PROTOCOL_VERSION),
    ({"MCP-Protocol-Version": "not-a-version"}, req("tools/list"), None,
     mcp.UNSUPPORTED_PROTOCOL_VERSION),
    ({"MCP-Protocol-Version": "2025-03-26"}, req("tools/list"), "2025-11-25", INVALID_REQUEST),
    ({"MCP-Protocol-Version": "2025-11-25"}, modern("tools/list"), None, mcp.HEADER_MISMATCH),
    ({}, req("tools/list", {"_meta": {META: "2027-01-01"}}), None,
     mcp.UNSUPPORTED_PROTOCOL_VERSION),
    ({}, req("tools/list", {"_meta": {META: 20260728}}), None, INVALID_PARAMS),
    ({}, req("tools/list"), "1999-01-01", mcp.UNSUPPORTED_PROTOCOL_VERSION),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "message", "session", "code"), DETECT_ERRORS)
def test_detect_version_refuses(
    headers: dict[str, str], message: Any, session: str | None, code: int
) -> None:
    with pytest.raises(JsonRpcError) as info:
        mcp.detect_version(headers, body(message).single, session)
    assert info.value.code == code
    assert info.value.http_status == 400


def test_unsupported_version_lists_what_we_speak() -> None:
    with pytest.raises(mcp.UnsupportedVersion) as info:
        mcp.detect_version(
            {"MCP-Protocol-Version": "1900-01-01"}, body(req("ping", msg_id=9)).single, None
        )
    out = json.loads(info.value.to_bytes())
    assert out["id"] == 9
    assert out["error"]["data"] == {
        "supported": list(mcp.KNOWN_VERSIONS),
        "requested": "1900-01-01",
    }


def test_negotiated_version() -> None:
    result = body({"jsonrpc": "2.0", "id": 1, "result": {"protocolVersion": "2025-06-18"}}).single
    assert result is not None
    assert mcp.negotiated_version(result) == "2025-06-18"
    assert mcp.negotiated_version({"jsonrpc": "2.0", "id": 1, "result": {}}) is None


@pytest.mark.parametrize(
    ("version", "batches", "modern", "cache"),
    [
        ("2025-03-26", True, False, False),
        ("2025-06-18", False, False, False),
        ("2025-11-25", False, False, False),
        ("2026-07-28", False, True, True),
    ],
)
def test_generation_predicates(version: str, batches: bool, modern: bool, cache: bool) -> None:
    assert mcp.batches_allowed(version) is batches
    assert mcp.is_2026(version) is modern
    assert mcp.supports_cache_scope(version) is cache


# -- batches and calls -------------------------------------------------------------------

BATCH = [req("tools/list", msg_id=1), req("tools/call", {"name": "a"}, msg_id="1")]


def test_batch_only_in_2025_03_26() -> None:
    calls = mcp.extract_calls(body(BATCH), {}, None)  # no header, no session: 2025-03-26
    assert [c.method for c in calls] == ["tools/list", "tools/call"]
    assert [c.id_key for c in calls] == [id_key(1), id_key("1")]
    for version in ("2025-06-18", "2025-11-25", "2026-07-28"):
        with pytest.raises(JsonRpcError) as info:
            mcp.extract_calls(body(BATCH), {"MCP-Protocol-Version": version}, None)
        assert info.value.code == INVALID_REQUEST, version
    with pytest.raises(JsonRpcError):
        mcp.extract_calls(body(BATCH), {}, "2025-06-18")  # negotiated in the session
    with pytest.raises(JsonRpcError):  # a 2026 request inside a batch
        mcp.extract_calls(body([modern("tools/list"), req("ping", msg_id=2)]), {}, None)


def test_initialize_not_in_a_batch() -> None:
    batch = [req("initialize", {"protocolVersion": "2025-03-26"}), req("ping", msg_id=2)]
    with pytest.raises(JsonRpcError):
        mcp.extract_calls(body(batch), {}, None)


def test_extract_calls() -> None:
    tool_call = body(json.loads(fixture("tools_call_2026.json")))
    (call,) = mcp.extract_calls(tool_call, {"MCP-Protocol-Version": "2026-07-28"}, None)
    assert call.kind is MessageKind.REQUEST
    assert (call.method, call.tool, call.version) == ("tools/call", "get_weather", "2026-07-28")
    assert call.arguments == {"location": "Seattle, WA"}
    assert call.session_id is None  # 2026 has no sessions, even if a header says so

    (call,) = mcp.extract_calls(
        body(req("resources/read", {"uri": "file:///a"}, msg_id="r")),
        {"Mcp-Session-Id": "s-1", "MCP-Protocol-Version": "2025-11-25"},
        "2025-11-25",
    )
    assert (call.resource_uri, call.id, call.session_id) == ("file:///a", "r", "s-1")

    (call,) = mcp.extract_calls(
        body(req("prompts/get", {"name": "review", "arguments": {"code": "x"}})), {}, None
    )
    assert (call.prompt_name, call.arguments, call.tool) == ("review", {"code": "x"}, None)

    (call,) = mcp.extract_calls(body(req("tools/call", {"name": "t"})), {}, None)
    assert call.arguments == {}

    (note,) = mcp.extract_calls(body(req("notifications/initialized", msg_id=None)), {}, None)
    assert note.is_notification and note.id is None


@pytest.mark.parametrize(
    "message",
    [
        req("tools/call", {"arguments": {}}),
        req("tools/call", {"name": 5}),
        req("tools/call", {"name": "a", "arguments": [1]}),
        req("tools/call", {"name": "a", "arguments": "x"}),
        req("prompts/get", {}),
        req("resources/read", {"uri": None}),
        req("resources/subscribe", {}),
        {"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": [1]},
    ],
)
def test_calls_missing_their_target(message: dict[str, Any]) -> None:
    with pytest.raises(JsonRpcError) as info:
        mcp.extract_calls(body(message), {}, None)
    assert info.value.code == INVALID_PARAMS
    assert info.value.id == message["id"]


def test_client_responses() -> None:
    answer = {"jsonrpc": "2.0", "id": 5, "result": {"action": "accept"}}
    (call,) = mcp.extract_calls(body(answer), {"MCP-Protocol-Version": "2025-11-25"}, None)
    assert call.kind is MessageKind.RESULT and call.method is None
    with pytest.raises(JsonRpcError):
        mcp.extract_calls(body(answer), {"MCP-Protocol-Version": "2026-07-28"}, None)


def test_pending_list_requests() -> None:
    calls = mcp.extract_calls(
        body([req("tools/list", msg_id=1), req("prompts/list", msg_id="1"), req("ping", msg_id=2)]),
        {},
        None,
    )
    assert mcp.pending_list_requests(calls) == {("n", 1): "tools/list", ("s", "1"): "prompts/list"}


# -- mirrored headers (2026-07-28) ---------------------------------------------------------


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


GOOD_HEADERS = {
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "get_weather",
}

HEADER_CASES: list[tuple[str, dict[str, Any], dict[str, str], int | None, str]] = [
    ("all good", modern("tools/call", {"name": "get_weather"}), GOOD_HEADERS, None, ""),
    ("names are case-insensitive", modern("tools/call", {"name": "get_weather"}),
     {"mcp-protocol-version": "2026-07-28", "MCP-METHOD": "tools/call", "mcp-name": "get_weather"},
     None, ""),
    ("base64 name", modern("tools/call", {"name": "Hello, 世界"}),
     {**GOOD_HEADERS, "Mcp-Name": b64("Hello, 世界")}, None, ""),
    ("resources/read by uri", modern("resources/read", {"uri": "file:///a b"}),
     {**GOOD_HEADERS, "Mcp-Method": "resources/read", "Mcp-Name": "file:///a b"}, None, ""),
    ("prompts/get", modern("prompts/get", {"name": "p"}),
     {**GOOD_HEADERS, "Mcp-Method": "prompts/get", "Mcp-Name": "p"}, None, ""),
    ("no name needed", modern("tools/list"),
     {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}, None, ""),
    ("missing Mcp-Method", modern("tools/call", {"name": "get_weather"}),
     {"MCP-Protocol-Version": "2026-07-28", "Mcp-Name": "get_weather"}, mcp.HEADER_MISMATCH,
     "Mcp-Method"),
    ("missing Mcp-Name", modern("tools/call", {"name": "get_weather"}),
     {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call"}, mcp.HEADER_MISMATCH,
     "Mcp-Name"),
    ("missing version header", modern("tools/call", {"name": "get_weather"}),
     {"Mcp-Method": "tools/call", "Mcp-Name": "get_weather"}, mcp.HEADER_MISMATCH,
     "MCP-Protocol-Version"),
    ("method mismatch", modern("tools/call", {"name": "get_weather"}),
     {**GOOD_HEADERS, "Mcp-Method": "tools/list"}, mcp.HEADER_MISMATCH, "Mcp-Method"),
    ("method case differs", modern("tools/call", {"name": "get_weather"}),
     {**GOOD_HEADERS, "Mcp-Method": "Tools/Call"}, mcp.HEADER_MISMATCH, "Mcp-Method"),
    ("name mismatch", modern("tools/call", {"name": "delete_everything"}), GOOD_HEADERS,
     mcp.HEADER_MISMATCH, "Mcp-Name"),
    ("uri mismatch", modern("resources/read", {"uri": "file:///b"}),
     {**GOOD_HEADERS, "Mcp-Method": "resources/read", "Mcp-Name": "file:///a"},
     mcp.HEADER_MISMATCH, "Mcp-Name"),
    ("base64 of another name", modern("tools/call", {"name": "get_weather"}),
     {**GOOD_HEADERS, "Mcp-Name": b64("delete_everything")}, mcp.HEADER_MISMATCH, "Mcp-Name"),
    ("bad base64", modern("tools/call", {"name": "get_weather"}),
     {**GOOD_HEADERS, "Mcp-Name": "=?base64?!!!?="}, mcp.HEADER_MISMATCH, "malformed"),
    ("base64 of bad UTF-8", modern("tools/call", {"name": "get_weather"}),
     {**GOOD_HEADERS, "Mcp-Name": "=?base64?" + base64.b64encode(b"\xff").decode() + "?="},
     mcp.HEADER_MISMATCH, "malformed"),
    ("raw non-ASCII name", modern("tools/call", {"name": "é"}), {**GOOD_HEADERS, "Mcp-Name": "é"},
     mcp.HEADER_MISMATCH, "malformed"),
    ("a name the body does not have", modern("tools/list"),
     {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list", "Mcp-Name": "x"},
     mcp.HEADER_MISMATCH, "Mcp-Name"),
    ("no _meta version", req("tools/call", {"name": "get_weather"}), GOOD_HEADERS, INVALID_PARAMS,
     "_meta"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("why", "message", "headers", "code", "says"), HEADER_CASES, ids=[c[0] for c in HEADER_CASES]
)
def test_mirrored_headers(
    why: str, message: dict[str, Any], headers: dict[str, str], code: int | None, says: str
) -> None:
    (call,) = mcp.extract_calls(body(message), headers, None)
    assert call.version == "2026-07-28"
    error = mcp_headers.check_mirrored_headers(call, headers)
    if code is None:
        assert error is None, why
        return
    assert error is not None, why
    assert error.code == code
    assert says in error.message
    assert error.http_status == 400
    out = json.loads(error.to_bytes())
    assert out["id"] == message["id"] and out["error"]["code"] == code


def test_mirrored_headers_only_in_2026() -> None:
    (call,) = mcp.extract_calls(body(req("tools/call", {"name": "a"})), {}, None)
    assert mcp_headers.check_mirrored_headers(call, {}) is None
    assert mcp_headers.check_mirrored_headers(call, {"Mcp-Name": "other"}) is None


def test_mirrored_headers_on_a_notification() -> None:
    note = req("notifications/x", msg_id=None)
    headers = {"MCP-Protocol-Version": "2026-07-28"}
    (call,) = mcp.extract_calls(body(note), headers, None)
    assert mcp_headers.check_mirrored_headers(call, headers) is None
    wrong = {**headers, "Mcp-Method": "notifications/y"}
    error = mcp_headers.check_mirrored_headers(call, wrong)
    assert error is not None and error.code == mcp.HEADER_MISMATCH


# -- denials ---------------------------------------------------------------------------------


def test_unknown_tool() -> None:
    out = json.loads(mcp_answers.unknown_tool("7", "delete_everything"))
    assert out == {
        "jsonrpc": "2.0",
        "id": "7",
        "error": {"code": -32602, "message": "Unknown tool: delete_everything"},
    }
    assert len(json.loads(mcp_answers.unknown_tool(1, "x" * 10_000))["error"]["message"]) < 300


@pytest.mark.parametrize(
    ("version", "has_type"), [("2025-11-25", False), ("2026-07-28", True), (None, False)]
)
def test_forbidden_arguments(version: str | None, has_type: bool) -> None:
    out = json.loads(mcp_answers.forbidden_arguments(3, "amount over the limit", version))
    assert out["id"] == 3 and "error" not in out
    result = out["result"]
    assert result["content"] == [{"type": "text", "text": "amount over the limit"}]
    assert result["isError"] is True
    assert ("resultType" in result) is has_type
    if has_type:
        assert result["resultType"] == "complete"


def test_denied_and_rate_limited() -> None:
    out = json.loads(mcp_answers.denied(1, "not allowed for spiffe://x/y"))
    assert out["error"] == {"code": mcp.POLICY_DENIED, "message": "not allowed for spiffe://x/y"}
    # Outside the JSON-RPC reserved range (-32768..-32000), as MCP 2026-07-28 asks.
    assert not -32768 <= mcp.POLICY_DENIED <= -32000
    assert not -32768 <= mcp.RATE_LIMITED <= -32000
    assert json.loads(mcp_answers.denied("a", "x", code=-32601))["error"]["code"] == -32601
    out = json.loads(mcp_answers.rate_limited("q", 1.2))
    assert out["id"] == "q"
    assert out["error"]["code"] == mcp.RATE_LIMITED
    assert out["error"]["data"] == {"retry_after": 2}
    assert json.loads(mcp_answers.rate_limited(1, 0))["error"]["data"] == {"retry_after": 1}
    assert json.loads(mcp_answers.rate_limited(1, float("inf")))["error"]["data"] == {
        "retry_after": 1
    }
    assert mcp.DENIAL_HTTP_STATUS == 200


# -- list filtering ----------------------------------------------------------------------------

ALLOW = {"get_weather", "code_review", "file:///project/src/main.rs"}


def allowed(name: str) -> bool:
    return name in ALLOW


def policy(method: str, name: str) -> bool:
    return name in ALLOW


FILTER = [
    # (fixture, method, version, kept, array member)
    ("tools_list_2026.json", "tools/list", "2026-07-28", ["get_weather"], "tools"),
    ("tools_list_2026.json", "tools/list", "2025-11-25", ["get_weather"], "tools"),
    ("tools_list_2025.json", "tools/list", "2025-06-18", ["get_weather"], "tools"),
    ("prompts_list.json", "prompts/list", "2025-03-26", ["code_review"], "prompts"),
    ("resources_list.json", "resources/list", "2026-07-28", ["file:///project/src/main.rs"],
     "resources"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "method", "version", "kept", "member"), FILTER)
def test_filter_list_result(
    name: str, method: str, version: str, kept: list[str], member: str
) -> None:
    raw = fixture(name)
    original = json.loads(raw)
    out = json.loads(mcp_answers.filter_list_result(raw, method, allowed, version))
    key = mcp.LIST_METHODS[method][1]
    assert [item[key] for item in out["result"][member]] == kept
    # Every other member is untouched, and key order is kept.
    for field, value in original["result"].items():
        if field not in (member, "cacheScope"):
            assert out["result"][field] == value
    expected_keys = list(original["result"])
    if mcp.supports_cache_scope(version) and "cacheScope" not in expected_keys:
        expected_keys.append("cacheScope")
    assert list(out["result"]) == expected_keys
    assert list(out) == list(original)
    assert out["id"] == original["id"] and type(out["id"]) is type(original["id"])
    if mcp.supports_cache_scope(version):
        assert out["result"]["cacheScope"] == "private"  # even over the server's "public"
    else:
        assert out["result"].get("cacheScope") == original["result"].get("cacheScope")
    kept_items = [i for i in original["result"][member] if i[key] in kept]
    assert out["result"][member] == kept_items  # the kept items are byte-for-byte the same values


def test_filter_list_result_edge_cases() -> None:
    error = b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}'
    assert mcp_answers.filter_list_result(error, "tools/list", allowed, "2026-07-28") == error
    not_a_list = b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}'
    assert (
        mcp_answers.filter_list_result(not_a_list, "tools/call", allowed, "2026-07-28")
        == not_a_list
    )
    malformed = {"jsonrpc": "2.0", "id": 1, "result": {"tools": {"name": "get_weather"}}}
    out = json.loads(mcp_answers.filter_list_result(malformed, "tools/list", allowed, "2025-11-25"))
    assert out["result"]["tools"] == []  # present but not an array: nothing shown
    junk_items = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [1, {"title": "x"}, {"name": 5},
                  {"name": "get_weather"}]}}  # fmt: skip
    out = json.loads(
        mcp_answers.filter_list_result(junk_items, "tools/list", allowed, "2025-11-25")
    )
    assert out["result"]["tools"] == [{"name": "get_weather"}]
    interim = {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "tools": []}}
    out = json.loads(mcp_answers.filter_list_result(interim, "tools/list", allowed, "2026-07-28"))
    assert "cacheScope" not in out["result"]  # SEP-2549: no hints on interim results
    with pytest.raises(JsonRpcError):  # duplicate keys: never judged
        mcp_answers.filter_list_result(
            b'{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"x"}]}}',
            "tools/list",
            allowed,
            "2025-11-25",
        )


def test_filter_batch_responses_per_pending_id() -> None:
    raw = fixture("batch_response_2025_03_26.json")
    pending = {("n", 1): "tools/list", ("n", 3): "prompts/list"}  # not ("s", "1")
    out = mcp_answers.filter_responses(raw, pending, policy, "2025-03-26", infer=False)
    assert out is not None
    items = json.loads(out)
    original = json.loads(raw)
    assert items[0]["result"]["tools"] == [{"name": "get_weather"}]
    assert items[1] == original[1]  # id "1" is not the pending id 1
    assert items[2] == original[2]
    assert items[3]["result"]["prompts"] == [{"name": "code_review"}]
    assert "cacheScope" not in items[0]["result"]


def test_filter_responses_infer_and_none() -> None:
    raw = fixture("tools_list_2025.json")
    assert mcp_answers.filter_responses(raw, {}, policy, "2025-11-25", infer=False) is None
    out = mcp_answers.filter_responses(raw, {}, policy, "2025-11-25", infer=True)
    assert out is not None
    assert [t["name"] for t in json.loads(out)["result"]["tools"]] == ["get_weather"]
    # A pending id naming another method wins over the shape.
    assert (
        mcp_answers.filter_responses(raw, {("s", "list-1"): "tools/call"}, policy, "x", infer=True)
        is None
    )
    for text in (b"", b"not json", b'{"jsonrpc":"2.0","method":"notifications/progress"}', b"42"):
        assert mcp_answers.filter_responses(text, {}, policy, "2025-11-25", infer=True) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]},"result":{"tools":[{"name":"x"}]}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"x","name":"get_weather"}]}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"\\ud800"}]}}',
        b'{"jsonrpc":"1.0","id":1,"result":{"tools":[{"name":"x"}]}}',
        b'{"jsonrpc":"2.0","id":1.0,"result":{"tools":[{"name":"x"}]}}',
    ],
)
def test_unfilterable_responses_fail_closed(raw: bytes) -> None:
    with pytest.raises(mcp.UnfilterableResponse) as info:
        mcp_answers.filter_responses(
            raw, {("n", 1): "tools/list"}, policy, "2025-11-25", infer=True
        )
    assert info.value.http_status == 502


def test_too_large_response_fails_closed() -> None:
    with pytest.raises(mcp.UnfilterableResponse):
        mcp_answers.filter_responses(
            fixture("tools_list_2025.json"), {}, policy, "x", infer=True, max_bytes=10
        )
