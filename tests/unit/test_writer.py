"""The HTTP/1.1 writer: heads, framing decisions and body encoding (no sockets).

Whatever the writer frames, the strict parser reads back as the same message.
"""

from __future__ import annotations

import pytest

from proxy.http.h11_parser import H11Parser
from proxy.http.wire import NEED_DATA, Body, End, Event, Framing, Head, Header
from proxy.http.writer import (
    BodyWriter,
    WriteError,
    frame_response,
    reason_for,
    request_framing,
    request_head,
    response_head,
)


def _events(parser: H11Parser) -> list[Event]:
    out: list[Event] = []
    while (event := parser.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        out.append(event)
    return out


def _frame(
    status: int, headers: list[Header], **kw: bool
) -> tuple[list[Header], Framing, int | None, bool]:
    opts = {"head_request": False, "client_http10": False, "keep_alive": True} | kw
    return frame_response(status, headers, **opts)


def test_reason_phrases() -> None:
    assert response_head(403, b"", []) == b"HTTP/1.1 403 Forbidden\r\n\r\n"
    assert response_head(200, b"Fine", [(b"a", b"b")]) == b"HTTP/1.1 200 Fine\r\na: b\r\n\r\n"
    assert reason_for(599) == b""


def test_a_length_answer_keeps_its_length() -> None:
    fields, framing, length, close = _frame(200, [(b"content-length", b"5")])
    assert (framing, length, close) == (Framing.LENGTH, 5, False)
    assert fields == [(b"content-length", b"5")]


def test_no_length_is_chunked_for_http11_and_until_close_for_http10() -> None:
    fields, framing, _, close = _frame(200, [(b"x", b"1")])
    assert framing is Framing.CHUNKED and not close
    assert (b"Transfer-Encoding", b"chunked") in fields
    fields, framing, _, close = _frame(
        200, [(b"transfer-encoding", b"chunked")], client_http10=True
    )
    assert framing is Framing.UNTIL_CLOSE and close
    assert (b"Connection", b"close") in fields
    assert not any(n.lower() == b"transfer-encoding" for n, _ in fields)


def test_chunked_wins_over_a_length() -> None:
    fields, framing, _, _ = _frame(
        200, [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")]
    )
    assert framing is Framing.CHUNKED
    assert fields == [(b"Transfer-Encoding", b"chunked")]


def test_head_204_and_304_answers_have_no_body() -> None:
    for status, kw in ((200, {"head_request": True}), (204, {}), (304, {})):
        _, framing, _, close = _frame(status, [(b"content-length", b"9")], **kw)
        assert framing is Framing.NONE and not close
    # HEAD to an HTTP/1.0 client: no body follows, so nothing forces a close.
    _, framing, _, close = _frame(200, [], head_request=True, client_http10=True)
    assert framing is Framing.NONE and not close


def test_connection_close_when_the_request_allows_no_other() -> None:
    fields, _, _, close = _frame(
        200, [(b"content-length", b"0"), (b"connection", b"keep-alive")], keep_alive=False
    )
    assert close and fields == [(b"content-length", b"0"), (b"Connection", b"close")]
    fields, _, _, close = _frame(200, [(b"content-length", b"0"), (b"Connection", b"close")])
    assert close and fields.count((b"Connection", b"close")) == 1


def test_body_writer_chunks_and_trailers() -> None:
    body = BodyWriter(Framing.CHUNKED)
    assert body.data(b"") == b""  # an empty chunk would end the body
    assert body.data(b"hello" * 4) == b"14\r\n" + b"hello" * 4 + b"\r\n"
    assert body.end([(b"x-sum", b"1")]) == b"0\r\nx-sum: 1\r\n\r\n"
    assert BodyWriter(Framing.CHUNKED).end() == b"0\r\n\r\n"


def test_body_writer_holds_to_the_length() -> None:
    body = BodyWriter(Framing.LENGTH, 4)
    assert body.data(b"ab") == b"ab"
    with pytest.raises(WriteError):
        body.end()  # two bytes short
    with pytest.raises(WriteError):
        body.data(b"abc")  # one too many
    assert body.data(b"cd") == b"cd" and body.end() == b""
    with pytest.raises(WriteError):
        BodyWriter(Framing.NONE).data(b"x")
    assert BodyWriter(Framing.UNTIL_CLOSE).data(b"x") == b"x"


def test_request_framing() -> None:
    assert request_framing([(b"Content-Length", b"3")]) == (Framing.LENGTH, 3, False)
    assert request_framing([(b"transfer-encoding", b"chunked")]) == (Framing.CHUNKED, None, False)
    chunked_too = [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")]
    assert request_framing(chunked_too) == (Framing.CHUNKED, None, False)
    assert request_framing([(b"content-length", b"0")]) == (Framing.NONE, 0, False)
    assert request_framing([(b"Connection", b"Close")]) == (Framing.NONE, 0, True)
    assert request_framing([]) == (Framing.NONE, 0, False)


def test_what_we_write_reads_back_the_same() -> None:
    headers = [(b"Host", b"h"), (b"transfer-encoding", b"chunked")]
    framing, length, _ = request_framing(headers)
    body = BodyWriter(framing, length)
    wire = request_head(b"POST", b"/a?b", headers) + body.data(b"abc") + body.end([(b"t", b"1")])
    parser = H11Parser("request")
    parser.feed(wire)
    head, data, end = _events(parser)
    assert isinstance(head, Head) and head.framing is Framing.CHUNKED
    assert (head.method, head.target) == (b"POST", b"/a?b")
    assert data == Body(b"abc") and end == End([(b"t", b"1")])

    fields, framing, length, _ = _frame(200, [(b"x", b"1")])
    body = BodyWriter(framing, length)
    wire = response_head(200, b"", fields) + body.data(b"xyz") + body.end()
    parser = H11Parser("response")
    parser.feed(wire)
    head, data, end = _events(parser)
    assert isinstance(head, Head) and (head.status, head.reason) == (200, b"OK")
    assert data == Body(b"xyz") and end == End()
