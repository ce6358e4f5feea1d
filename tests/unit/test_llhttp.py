"""The llhttp MessageParser: each strictness rule and each signal, table-driven."""

from __future__ import annotations

import gc

import pytest

from proxy.http.llhttp import LlhttpParser
from proxy.http.wire import NEED_DATA, Body, End, Event, Framing, Head, ParseError, ParserLimits

H = b"Host: h\r\n"


def events(parser: LlhttpParser, *chunks: bytes) -> list[Event]:
    out: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (event := parser.next_event()) is not NEED_DATA:
            out.append(event)  # type: ignore[arg-type]
    return out


def refused(data: bytes, role: str = "request", limits: ParserLimits | None = None) -> ParseError:
    parser = LlhttpParser(role, limits)  # type: ignore[arg-type]
    with pytest.raises(ParseError) as caught:
        for i in range(len(data)):  # byte by byte: no rule may depend on the split
            events(parser, data[i : i + 1])
        events(parser, b"")
    return caught.value


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET / HTTP/1.1\nHost: h\n\n", 400, "bad_request"),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400, "bad_request"),  # bare CR
        (b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", 400, "bad_request"),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "bad_request"),  # space before colon
        (b"GET / HTTP/1.1\r\n" + H + b"X[y: 1\r\n\r\n", 400, "bad_request"),  # bad token
        (b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400, "bad_request"),
        (b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_request"),  # double space
        (b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_request"),  # leading empty line
        (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),  # no Host
        (b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400, "bad_request"),  # two Hosts
        (
            b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            400,
            "bad_request",
        ),
        (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\nx", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),  # bad chunk framing
        (
            b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, "http_version_not_supported"),
        (b"GET / HTTP/1.1\r\n" + H + b"X: " + b"v" * 3000 + b"\r\n\r\n", 431, "header_too_large"),
        (b"GET / HTTP/1.1\r\n" + H + b"X: v\r\n" * 30 + b"\r\n", 431, "header_too_large"),
        (b"GET / HTTP/1.1\r\n" + H + b"X: v\r\n" * 600, 431, "header_too_large"),  # unfinished
        (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nab", 400, "bad_request"),  # EOF
    ],
)
def test_requests_refused(data: bytes, status: int, reason: str) -> None:
    error = refused(data, limits=ParserLimits(max_header_bytes=2048, max_headers=24))
    assert (error.status, error.reason) == (status, reason)


def test_response_errors_are_502() -> None:
    error = refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", "response")
    assert (error.status, error.reason) == (502, "bad_upstream_response")
    assert refused(b"HTTP/1.1 200 O\x01K\r\n\r\n", "response").status == 502


def test_keep_alive_messages_reuse_one_llhttp_and_pipelined_bytes_wait() -> None:
    parser = LlhttpParser("request")
    llhttp = parser._llhttp
    two = (
        b"GET /1 HTTP/1.1\r\n"
        + H
        + b"\r\nPOST /2 HTTP/1.1\r\n"
        + H
        + b"Content-Length: 2\r\n\r\nok"
    )
    first = events(parser, two)
    assert [type(e) for e in first] == [Head, End] and first[0].target == b"/1"  # type: ignore[union-attr]
    assert parser.next_event() is NEED_DATA  # the second waits for start_next_cycle
    assert parser.buffered.startswith(b"POST /2")
    parser.start_next_cycle()
    second = events(parser, b"")
    assert [type(e) for e in second] == [Head, Body, End]
    head = second[0]
    assert isinstance(head, Head) and head.framing is Framing.LENGTH and head.content_length == 2
    assert parser._llhttp is llhttp


@pytest.mark.parametrize("role", ["request", "response"])
def test_a_dropped_parser_is_freed_at_once_not_by_the_garbage_collector(role: str) -> None:
    """llhttp calls the parser back, yet must not keep it alive: a cycle per
    connection would wait for a collection (with the collector off: forever)."""
    message = (
        b"POST /u HTTP/1.1\r\n" + H if role == "request" else b"HTTP/1.1 200 OK\r\n"
    ) + b"Content-Length: 2\r\n\r\nok"

    def alive() -> int:
        return sum(isinstance(o, LlhttpParser) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = alive()
        parser = LlhttpParser(role)  # type: ignore[arg-type]
        assert [type(e) for e in events(parser, message)] == [Head, Body, End]
        assert alive() == before + 1
        del parser
        assert alive() == before
    finally:
        gc.enable()


def test_chunked_body_and_trailers() -> None:
    data = (
        b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\nX-Two: y\r\n\r\n"
    )
    out = events(LlhttpParser("request"), *[data[i : i + 7] for i in range(0, len(data), 7)])
    assert b"".join(e.data for e in out if isinstance(e, Body)) == b"abcde"
    assert isinstance(out[-1], End) and out[-1].trailers == [(b"X-Sum", b"5"), (b"X-Two", b"y")]


def test_expect_100_continue_is_signalled_until_the_body_starts() -> None:
    parser = LlhttpParser("request")
    head = b"PUT /f HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    assert [type(e) for e in events(parser, head)] == [Head]
    assert parser.expects_continue
    events(parser, b"abc")
    assert not parser.expects_continue


def test_upgrade_and_connect_keep_the_other_protocol_bytes() -> None:
    parser = LlhttpParser("request")
    out = events(
        parser,
        b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket"
        b"\r\n\r\n\x81\x05hello",
    )
    assert isinstance(out[0], Head) and out[0].upgrade and isinstance(out[1], End)
    assert parser.buffered == b"\x81\x05hello"
    parser = LlhttpParser("request")
    out = events(parser, b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01")
    assert isinstance(out[0], Head) and out[0].upgrade and parser.buffered == b"\x16\x03\x01"


def test_responses_head_informational_and_until_close() -> None:
    parser = LlhttpParser("response")
    parser.for_head_request()
    out = events(parser, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert [type(e) for e in out] == [Head, End] and out[0].framing is Framing.NONE  # type: ignore[union-attr]
    parser.start_next_cycle()
    out = events(parser, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert [(type(e), getattr(e, "status", None)) for e in out] == [
        (Head, 100),
        (Head, 204),
        (End, None),
    ]
    parser.start_next_cycle()
    out = events(parser, b"HTTP/1.1 200 OK\r\n\r\nstream", b" more", b"")
    head = out[0]
    assert isinstance(head, Head) and head.framing is Framing.UNTIL_CLOSE and not head.keep_alive
    assert b"".join(e.data for e in out if isinstance(e, Body)) == b"stream more"
    assert isinstance(out[-1], End)


def test_http10_and_connection_close_end_the_connection() -> None:
    for data in (
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    ):
        parser = LlhttpParser("request")
        head = events(parser, data)[0]
        assert isinstance(head, Head) and not head.keep_alive
        with pytest.raises(RuntimeError):
            parser.start_next_cycle()
