"""The h11-backed MessageParser: events, strictness and errors (no sockets)."""

from __future__ import annotations

import random

import pytest

from proxy.http.h11_parser import H11Parser
from proxy.http.wire import (
    NEED_DATA,
    Body,
    End,
    Event,
    Framing,
    Head,
    ParseError,
    ParserLimits,
    Role,
)


def drain(parser: H11Parser) -> list[Event]:
    events: list[Event] = []
    while (event := parser.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        events.append(event)
    return events


def test_a_request_with_a_body() -> None:
    parser = H11Parser("request")
    parser.feed(b"POST /up?x=1 HTTP/1.1\r\nHost: h\r\nX-Caps: V\r\nContent-Length: 5\r\n\r\nhello")
    head, body, end = drain(parser)
    assert isinstance(head, Head)
    assert (head.method, head.target, head.version) == (b"POST", b"/up?x=1", b"1.1")
    assert head.framing is Framing.LENGTH and head.content_length == 5
    assert (b"X-Caps", b"V") in head.headers  # as spelled on the wire
    assert b"x-caps" in head.names and head.keep_alive and not head.upgrade
    assert body == Body(b"hello") and end == End()


def test_chunked_request_with_trailers() -> None:
    parser = H11Parser("request")
    parser.feed(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n"
    )
    events = drain(parser)
    assert isinstance(events[0], Head) and events[0].framing is Framing.CHUNKED
    assert b"".join(e.data for e in events if isinstance(e, Body)) == b"abc"
    assert events[-1] == End(trailers=[(b"X-Sum", b"1")])


def test_pipelined_requests_wait_for_the_next_cycle() -> None:
    parser = H11Parser("request")
    parser.feed(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    first = drain(parser)
    assert [type(e) for e in first] == [Head, End]
    assert parser.next_event() is NEED_DATA  # not parsed behind the caller's back
    parser.start_next_cycle()
    second = drain(parser)
    assert isinstance(second[0], Head) and second[0].target == b"/2"


def test_a_head_one_byte_at_a_time() -> None:
    raw = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    parser = H11Parser("request")
    for i in range(len(raw) - 1):
        parser.feed(raw[i : i + 1])
        assert parser.next_event() is NEED_DATA
    parser.feed(raw[-1:])
    head = parser.next_event()
    assert isinstance(head, Head) and head.target == b"/x"


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"GET / HTTP/1.1\nHost: h\n\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
            400,
            "bad_request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc",
            400,
            "bad_request",
        ),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431, "header_too_large"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, 431, "header_too_large"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"\x16\x03\x01garbage\r\n\r\n", 400, "bad_request"),
    ],
    ids=[
        "bare-lf",
        "bare-cr",
        "obs-fold",
        "dup-cl",
        "cl-and-te",
        "te-gzip",
        "chunk-bare-lf",
        "too-many-headers",
        "head-too-big",
        "no-host",
        "garbage",
    ],
)
def test_requests_the_peer_got_wrong(raw: bytes, status: int, reason: str) -> None:
    parser = H11Parser("request", ParserLimits(max_header_bytes=65536, max_headers=100))
    with pytest.raises(ParseError) as caught:
        parser.feed(raw)
        drain(parser)
    assert (caught.value.status, caught.value.reason) == (status, reason)
    with pytest.raises(ParseError):  # dead once it refused
        parser.next_event()


def test_a_close_inside_a_head_is_refused_and_between_requests_is_not() -> None:
    parser = H11Parser("request")
    parser.feed(b"")
    assert parser.next_event() is NEED_DATA
    partial = H11Parser("request")
    partial.feed(b"GET / HT")
    partial.feed(b"")
    with pytest.raises(ParseError):
        partial.next_event()


def test_responses_framing_head_interim_and_until_close() -> None:
    parser = H11Parser("response")
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    interim, head, body, end = drain(parser)
    assert isinstance(interim, Head) and interim.status == 100
    assert isinstance(head, Head) and head.status == 200 and head.reason == b"OK"
    assert body == Body(b"ok") and end == End()
    parser.start_next_cycle()
    parser.for_head_request()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    head, end = drain(parser)
    assert isinstance(head, Head) and head.framing is Framing.NONE and end == End()
    parser.start_next_cycle()
    parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    head, body = drain(parser)
    assert isinstance(head, Head) and head.framing is Framing.UNTIL_CLOSE
    assert not head.keep_alive and body == Body(b"all of it")
    parser.feed(b"")
    assert drain(parser) == [End()]


def test_an_upgrade_answer_leaves_the_tunnel_bytes_buffered() -> None:
    parser = H11Parser("response")
    parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n")
    parser.feed(b"\x81\x02hi")
    head = parser.next_event()
    assert isinstance(head, Head) and head.status == 101 and head.upgrade
    assert parser.buffered == b"\x81\x02hi"


def test_a_broken_response_is_the_upstreams_fault() -> None:
    parser = H11Parser("response")
    parser.feed(b"HTTP/1.1 abc\r\n\r\n")
    with pytest.raises(ParseError) as caught:
        parser.next_event()
    assert (caught.value.status, caught.value.reason) == (502, "bad_upstream_response")


SEEDS = [
    b"GET /a?b=c HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil close",
]
NASTY = [b"\r", b"\n", b"\x00", b":", b" ", b"\t", b"\xff", b"0", b"\r\n\r\n", b",", b";"]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out) + 1)
        choice = rng.random()
        if choice < 0.3 and out:
            del out[pos : pos + rng.randint(1, 4)]
        elif choice < 0.6:
            out[pos:pos] = rng.choice(NASTY)
        elif out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
    return bytes(out)


def test_any_bytes_in_any_pieces_raise_only_parse_error() -> None:
    rng = random.Random(20261201)
    for case in range(3000):
        seed = SEEDS[case % len(SEEDS)]
        role: Role = "response" if seed.startswith(b"HTTP/") else "request"
        data = _mutate(rng, seed)
        parser = H11Parser(role, ParserLimits(max_header_bytes=1024, max_headers=20))
        try:
            pos = 0
            while pos < len(data):
                step = rng.randint(1, 16)
                parser.feed(data[pos : pos + step])
                pos += step
                for _ in range(8):
                    event = parser.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, End):
                        parser.start_next_cycle()
            parser.feed(b"")
            for _ in range(8):
                if parser.next_event() is NEED_DATA:
                    break
        except ParseError:
            pass
