"""Trailer fields on the llhttp parser read as h11 reads them (no sockets).

llhttp applies head rules to a trailer section (Content-Length there with a
chunked body is an error to it); h11 takes such fields as fields, which the
relay then filters (tests/integration/test_http_hardening.py). Both parsers
must agree on what they accept and on the fields they give.
"""

from __future__ import annotations

import pytest

from proxy.http.h11_parser import H11Parser
from proxy.http.llhttp import LlhttpParser
from proxy.http.wire import NEED_DATA, End, Event, ParseError

HEAD = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"


def _read(parser: H11Parser | LlhttpParser, raw: bytes, step: int) -> list[Event]:
    for i in range(0, len(raw), step):
        parser.feed(raw[i : i + step])
    out: list[Event] = []
    while (event := parser.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        out.append(event)
    return out


@pytest.mark.parametrize("step", [1, 7, 1 << 16])
def test_trailers_that_look_like_framing_are_fields(step: int) -> None:
    raw = HEAD + (
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nX_Spiffe_Id: forged\r\n"
        b"X-Checksum:  a  bc \r\nEmpty:\r\n\r\nGET"
    )
    ours, oracle = LlhttpParser("request"), H11Parser("request")
    events = _read(ours, raw, step)
    assert events == _read(oracle, raw, step)
    end = events[-1]
    assert isinstance(end, End)
    assert end.trailers == [
        (b"Content-Length", b"5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X_Spiffe_Id", b"forged"),
        (b"X-Checksum", b"a  bc"),
        (b"Empty", b""),
    ]
    assert ours.buffered == b"GET"  # the next request is not read into this one


@pytest.mark.parametrize(
    "line", [b"X y: 1\r\n", b"X:\x01\r\n", b" folded\r\n", b"X: a\rb\r\n", b"X: a\n", b": v\r\n"]
)
def test_malformed_trailer_fields_are_refused(line: bytes) -> None:
    parser = LlhttpParser("request")
    with pytest.raises(ParseError) as refused:
        _read(parser, HEAD + line + b"\r\n", 1 << 16)
    assert refused.value.status == 400


@pytest.mark.parametrize("step", [1, 5, 1 << 16])
@pytest.mark.parametrize(
    "fields",
    [
        b"",
        b"Empty:\r\nBlank: \t \r\nTabbed:\tv\t\r\nInner:  a \t b  \r\n",
        b'Obs: caf\xc3\xa9 \xff\r\nColon: a:b: c\r\nX_Under: 1\r\nQuote: "x, y"\r\n',
        b"".join(b"F%d: %d\r\n" % (i, i) for i in range(24)),
    ],
)
def test_fields_read_from_the_raw_head_are_the_oracles(fields: bytes, step: int) -> None:
    """The parser reads field lines from the head llhttp checked, in one
    match: names as spelled, values without surrounding blanks, as h11."""
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n"
    response = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"
    for role, data in (("request", raw), ("response", response)):
        ours, oracle = LlhttpParser(role), H11Parser(role)
        assert _read(ours, data, step) == _read(oracle, data, step)
