"""SSE filtering: byte-for-byte pass-through at every split point, and the
list responses (only those) rewritten."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.agent.mcp import UnfilterableResponse
from proxy.agent.sse import SseError, SseEventTooLarge, SseFilter, Transform, make_list_transform

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mcp"
STREAM_LF = (FIXTURES / "stream.sse").read_bytes()
EOLS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}

TOOLS_LINE = (
    b'data: {"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"get_weather"},'
    b'{"name":"delete_everything"}],"nextCursor":"n"}}'
)
FILTERED_LINE = (
    b'data: {"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"get_weather"}],"nextCursor":"n"}}'
)


def stream(eol: str) -> bytes:
    return STREAM_LF.replace(b"\n", EOLS[eol])


def policy(method: str, name: str) -> bool:
    return name == "get_weather"


def run(transform: Transform, chunks: list[bytes], **kw: int) -> bytes:
    sse = SseFilter(transform, **kw)
    return b"".join(sse.feed(chunk) for chunk in chunks) + sse.close()


def splits(data: bytes) -> list[list[bytes]]:
    """Every single split point, plus one byte at a time."""
    out = [[data[:k], data[k:]] for k in range(len(data) + 1)]
    out.append([data[i : i + 1] for i in range(len(data))])
    return out


def never(data: str) -> str | None:
    return None


@pytest.mark.parametrize("eol", list(EOLS))
def test_pass_through_at_every_split(eol: str) -> None:
    data = stream(eol)
    for chunks in splits(data):
        assert run(never, chunks) == data


@pytest.mark.parametrize("eol", list(EOLS))
def test_list_response_rewritten_at_every_split(eol: str) -> None:
    data = stream(eol)
    expected = data.replace(TOOLS_LINE, FILTERED_LINE)
    assert expected != data
    transform = make_list_transform({("n", 7): "tools/list"}, policy, "2025-11-25")
    for chunks in splits(data):
        assert run(transform, chunks) == expected


@pytest.mark.parametrize("eol", list(EOLS))
def test_events_seen_by_the_transform(eol: str) -> None:
    seen: list[str] = []

    def record(data: str) -> None:
        seen.append(data)

    for chunks in ([stream(eol)], [stream(eol)[i : i + 1] for i in range(len(stream(eol)))]):
        seen.clear()
        run(lambda d: record(d), chunks)
        assert (
            seen
            == [
                "",  # "data:" with no value still dispatches (the priming event)
                '{"jsonrpc":"2.0","method":"notifications/progress",\n'
                ' "params":{"progressToken":"t","progress":1}}',  # one space stripped, lines joined
                TOOLS_LINE[len(b"data: ") :].decode(),
                '{"jsonrpc":"2.0","id":8,"result":{"content":[{"type":"text",'
                '"text":"tools: none"}],"isError":false}}',
                "not json at all\nsecond line",
            ]
        )  # comments, retry-only and keep-alive blocks dispatch nothing


def test_replay_without_pending_id() -> None:
    transform = make_list_transform({}, policy, "2025-11-25")
    assert run(transform, [STREAM_LF]) == STREAM_LF.replace(TOOLS_LINE, FILTERED_LINE)


def test_pending_is_read_live() -> None:
    pending: dict[tuple[str, str | int], str] = {}
    transform = make_list_transform(pending, policy, "2026-07-28")
    event = b'data: {"jsonrpc":"2.0","id":"p","result":{"prompts":[{"name":"x"}]}}\n\n'
    out = json.loads(run(transform, [event])[len(b"data: ") :])
    assert out["result"]["prompts"] == []  # inferred from the shape
    pending[("s", "p")] = "tools/list"  # the pending method wins: no tools member, left alone
    assert run(transform, [event]) == event


def test_rewrite_keeps_other_fields_in_place() -> None:
    event = (
        b": before\r\n"
        b"id: 42\r\n"
        b'data: {"jsonrpc":"2.0","id":1,\r\n'
        b"event: message\r\n"
        b'data: "result":{"tools":[{"name":"a"},{"name":"get_weather"}]}}\r\n'
        b"retry: 10\r\n"
        b"\r\n"
    )
    transform = make_list_transform({("n", 1): "tools/list"}, policy, "2026-07-28")
    assert run(transform, [event]) == (
        b": before\r\n"
        b"id: 42\r\n"
        b'data: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_weather"}],'
        b'"cacheScope":"private"}}\r\n'
        b"event: message\r\n"
        b"retry: 10\r\n"
        b"\r\n"
    )


def test_replacement_with_newlines_becomes_data_lines() -> None:
    out = run(lambda d: "a\nb\r\nc\rd", [b"id: 1\ndata: x\n\n"])
    assert out == b"id: 1\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert run(lambda d: "", [b"data: x\n\n"]) == b"data: \n\n"


FIELDS = [
    # Lines that are not "data" fields never reach the transform.
    b"Data: x\n\n",
    b"data : x\n\n",
    b" data: x\n\n",
    b":data: x\n\n",
    b"dataa: x\n\n",
]


@pytest.mark.parametrize("raw", FIELDS)
def test_only_exact_data_fields_count(raw: bytes) -> None:
    called: list[str] = []
    assert run(lambda d: called.append(d) or "X", [raw]) == raw
    assert called == []


def test_data_without_colon_and_without_space() -> None:
    seen: list[str] = []
    run(lambda d: seen.append(d) or None, [b"data\ndata:x\ndata:  y\n\n"])
    assert seen == ["\nx\n y"]


def test_bom_is_kept_and_ignored() -> None:
    data = b"\xef\xbb\xbf" + STREAM_LF
    transform = make_list_transform({}, policy, "2025-11-25")
    expected = data.replace(TOOLS_LINE, FILTERED_LINE)
    for chunks in splits(data):
        assert run(transform, chunks) == expected
    # A BOM makes the first line a real field, exactly as a client reads it.
    seen: list[str] = []
    run(lambda d: seen.append(d) or None, [b"\xef\xbb", b"\xbfdata: first\n\n"])
    assert seen == ["first"]
    # Only at the very start.
    seen.clear()
    run(lambda d: seen.append(d) or None, [b"data: a\n\n\xef\xbb\xbfdata: b\n\n"])
    assert seen == ["a"]


def test_unterminated_last_event_is_filtered_at_close() -> None:
    transform = make_list_transform({}, policy, "2025-11-25")
    tail = TOOLS_LINE  # no line end, no blank line: a lenient client might still take it
    sse = SseFilter(transform)
    assert sse.feed(tail) == b""
    assert sse.close() == FILTERED_LINE + b"\n"  # still no blank line: not dispatched
    sse = SseFilter(transform)
    assert sse.feed(b"id: 3\r\n" + tail + b"\r\n") == b""
    assert sse.close() == b"id: 3\r\n" + FILTERED_LINE + b"\r\n"
    sse = SseFilter(never)
    assert sse.feed(b"data: partial") == b""
    assert sse.close() == b"data: partial"
    assert sse.close() == b""


def test_held_size_cap_fails_closed() -> None:
    big = b"data: " + b"x" * 100
    sse = SseFilter(never, max_event_bytes=64)
    with pytest.raises(SseEventTooLarge):
        sse.feed(big)
    with pytest.raises(SseError):
        sse.feed(b"\n\n")
    assert sse.close() == b""
    # A complete event over the cap is refused too, even in one chunk.
    with pytest.raises(SseEventTooLarge):
        run(never, [big + b"\n\n"], max_event_bytes=64)
    # At the cap is fine; the cap is per event, not per stream.
    event = b"data: " + b"y" * 56 + b"\n\n"
    assert len(event) == 64
    assert run(never, [event * 10], max_event_bytes=64) == event * 10


def test_transform_errors_close_the_stream() -> None:
    transform = make_list_transform({("n", 1): "tools/list"}, policy, "2025-11-25")
    dup = b'data: {"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"x"}]}}\n\n'
    sse = SseFilter(transform)
    assert sse.feed(b"data: {}\n\n") == b"data: {}\n\n"
    with pytest.raises(UnfilterableResponse):
        sse.feed(dup)
    with pytest.raises(SseError):
        sse.feed(b"data: {}\n\n")


def test_feed_after_close() -> None:
    sse = SseFilter(never)
    sse.close()
    with pytest.raises(SseError):
        sse.feed(b"data: x\n\n")


def test_cr_split_from_lf_is_one_line_end() -> None:
    # "data: a\r" + "\n\r\n": the LF completes the CRLF, it is not a blank line.
    seen: list[str] = []
    rec: Callable[[str], str | None] = lambda d: seen.append(d) or None  # noqa: E731
    out = run(rec, [b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert seen == ["a\nb"]
    assert out == b"data: a\r\ndata: b\r\n\r\n"
    # A lone CR really is a line end: CR CR dispatches.
    seen.clear()
    assert run(rec, [b"data: a\r", b"\rdata: b\r\r"]) == b"data: a\r\rdata: b\r\r"
    assert seen == ["a", "b"]
