"""Keep-alive decisions without sockets: when a connection may carry another
exchange, and when it must close (what h11's state machine decided)."""

from __future__ import annotations

import pytest

from proxy.http.cycle import Cycle, CycleError, Side
from proxy.http.h11_parser import H11Parser
from proxy.http.wire import Head, Role


def head(raw: bytes, role: Role = "request", *, head_request: bool = False) -> Head:
    parser = H11Parser(role)
    if head_request:
        parser.for_head_request()
    parser.feed(raw)
    event = parser.next_event()
    assert isinstance(event, Head)
    return event


GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def served(request: bytes, *, we_close: bool = False) -> Cycle:
    """A server side that read ``request`` and wrote a whole answer."""
    cycle = Cycle()
    assert cycle.may_answer and not cycle.answered
    cycle.read_head(head(request))
    cycle.read_end()
    cycle.wrote_head(we_close)
    assert not cycle.may_answer
    cycle.wrote_end()
    assert cycle.answered
    return cycle


def fetched(response: bytes) -> Cycle:
    """A client side (an upstream) that wrote a GET and read ``response``."""
    cycle = Cycle()
    cycle.wrote_head(False)
    cycle.wrote_end()
    cycle.read_head(head(response, "response"))
    cycle.read_end()
    return cycle


def test_http11_keeps_alive_and_starts_over() -> None:
    cycle = served(GET)
    assert cycle.reusable and cycle.close_reason is None
    cycle.next_cycle()
    assert (cycle.reading, cycle.writing) == (Side.IDLE, Side.IDLE) and cycle.may_answer


@pytest.mark.parametrize(
    ("request_bytes", "we_close", "reason"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", False, "HTTP/1.0"),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False, "HTTP/1.0"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", False, "no keep-alive"),
        (GET, True, "we said close"),
    ],
)
def test_server_must_close(request_bytes: bytes, we_close: bool, reason: str) -> None:
    cycle = served(request_bytes, we_close=we_close)
    assert not cycle.reusable and cycle.close_reason == reason
    with pytest.raises(CycleError):
        cycle.next_cycle()


def test_upstream_reuse() -> None:
    assert fetched(OK).reusable
    closing = fetched(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert closing.close_reason == "no keep-alive"
    assert fetched(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").close_reason == "HTTP/1.0"
    until_close = fetched(b"HTTP/1.1 200 OK\r\n\r\n")
    assert until_close.close_reason == "body read until close" and not until_close.reusable


def test_not_reusable_until_both_messages_end() -> None:
    cycle = Cycle()
    cycle.read_head(head(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"))
    cycle.wrote_head(False)
    cycle.wrote_end()  # answered early; the request body is still unread
    assert cycle.reading is Side.BODY and not cycle.reusable
    cycle.read_end()
    assert cycle.reusable


def test_an_error_on_either_side_closes() -> None:
    cycle = Cycle()
    cycle.read_head(head(GET))
    cycle.broken("request_timeout")
    cycle.broken("later")  # the first cause is the one kept
    cycle.read_end()
    cycle.wrote_head(False)
    cycle.wrote_end()
    assert not cycle.reusable and cycle.close_reason == "request_timeout"


def test_a_protocol_switch_ends_http() -> None:
    server = Cycle()
    server.read_head(
        head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n")
    )
    server.read_end()
    server.wrote_informational(101)
    assert server.switched and not server.reusable and not server.answered
    client = Cycle()
    client.read_head(head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n", "response"))
    assert client.switched and not client.reusable


def test_expect_continue_window() -> None:
    expect = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    for close_window in ("read_body", "read_end", "informational", "head"):
        cycle = Cycle()
        cycle.read_head(head(expect))
        assert cycle.expect_continue
        if close_window == "informational":
            cycle.wrote_informational(100)
        elif close_window == "head":
            cycle.wrote_head(False)
        else:
            getattr(cycle, close_window)()
        assert not cycle.expect_continue
    for no_window in (
        b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",  # no body
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
    ):
        cycle = Cycle()
        cycle.read_head(head(no_window))
        assert not cycle.expect_continue
