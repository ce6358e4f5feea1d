"""The request head the upstream gets (pure): what we add is checked, the
names are lowered once, and the spelling we write stays as given.

These hold the shortcuts of the hot path to the plain reading: fields we
add are checked once per value (a cache), the parser's lowered names are
reused by the request's fields, and the writer trusts names said to be
lower-case already.
"""

from __future__ import annotations

import pytest

from proxy.http.exchange import RequestOutcome
from proxy.http.headers import forwardable
from proxy.http.llhttp import LlhttpParser
from proxy.http.routing import Routed, upstream_request_for
from proxy.http.wire import NEED_DATA, Fields, Head, Request, lowered
from proxy.http.writer import WriteError, frame_response, request_framing
from proxy.policy.verdict import RequestVerdict

TRACEPARENT = (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")


def _request(*fields: tuple[bytes, bytes]) -> Request:
    raw = [(b"Host", b"h"), *fields]
    return Request(b"GET", b"/x", Fields([(n.lower(), v) for n, v in raw], raw))


def _routed(*add: tuple[bytes, bytes]) -> Routed:
    return Routed(RequestVerdict(True, "rule_matched", "r"), target=b"/x", add_headers=add)


def _upstream(request: Request, routed: Routed, *trace: tuple[bytes, bytes]) -> Request:
    outcome = RequestOutcome("rid", "GET", "/x")
    return upstream_request_for(request, routed, False, True, outcome, trace)


def test_added_fields_keep_their_spelling_and_read_lowered() -> None:
    up = _upstream(_request((b"X-A", b"1")), _routed((b"Authorization", b"Bearer t")), TRACEPARENT)
    assert up.headers.raw_items() == [
        (b"host", b"h"),
        (b"x-a", b"1"),
        (b"Authorization", b"Bearer t"),
        TRACEPARENT,
        (b"x-request-id", b"rid"),
    ]
    assert list(up.headers) == [(n.lower(), v) for n, v in up.headers.raw_items()]


@pytest.mark.parametrize(
    "bad",
    [(b"Authorization", b"Bearer t\r\nX-Evil: 1"), (b"Bad Name", b"v"), (b"x-a", b" padded")],
)
def test_an_illegal_added_field_is_refused_every_time(bad: tuple[bytes, bytes]) -> None:
    good = (bad[0] if b" " not in bad[0] else b"X-Ok", b"fine")
    for _ in range(2):  # a legal value of the same name was seen (and remembered) first
        _upstream(_request(), _routed(good))
        with pytest.raises(WriteError):
            _upstream(_request(), _routed(good, bad))


def test_the_check_cache_does_not_grow_without_bound() -> None:
    from proxy.http import routing

    for i in range(routing._CHECKED_MAX + 10):
        _upstream(_request(), _routed((b"x-forwarded-client-cert", b"By=a;Hash=%d" % i)))
    assert len(routing._CHECKED) <= routing._CHECKED_MAX


def test_tracestate_we_echo_is_checked() -> None:
    up = _upstream(_request(), _routed(), TRACEPARENT, (b"tracestate", b"k=v"))
    assert up.headers.raw_items()[-2] == (b"tracestate", b"k=v")
    with pytest.raises(WriteError):
        _upstream(_request(), _routed(), TRACEPARENT, (b"tracestate", b"k=v\r\nx: y"))


def test_request_fields_reuse_the_parsers_lowered_names() -> None:
    parser = LlhttpParser("request")
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Mixed-Case: V\r\nCONTENT-length: 0\r\n\r\n")
    head = parser.next_event()
    assert isinstance(head, Head) and head.lowered is not None
    assert lowered(head) is head.lowered
    assert head.lowered == [(n.lower(), v) for n, v in head.headers]
    assert head.names == frozenset(n for n, _ in head.lowered)
    # A head some other parser built gets its lowered names on first use.
    other = Head(version=b"1.1", headers=[(b"A-B", b"1")], framing=head.framing)
    assert lowered(other) == [(b"a-b", b"1")] and other.lowered is not None
    assert other == Head(version=b"1.1", headers=[(b"A-B", b"1")], framing=head.framing)
    assert parser.next_event() is not NEED_DATA


@pytest.mark.parametrize(
    "fields",
    [
        [(b"content-length", b"3"), (b"connection", b"keep-alive, x"), (b"x", b"1")],
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"3"), (b"a", b"b")],
        [(b"content-length", b"0"), (b"content-length", b"5")],
        [(b"date", b"d"), (b"connection", b"close")],
        [],
    ],
)
@pytest.mark.parametrize("http10", [False, True])
def test_names_said_lowered_frame_as_lowering_would(
    fields: list[tuple[bytes, bytes]], http10: bool
) -> None:
    opts = {"head_request": False, "client_http10": http10, "keep_alive": True}
    assert frame_response(200, fields, names_lowered=True, **opts) == frame_response(
        200, fields, **opts
    )
    assert request_framing(fields, names_lowered=True) == request_framing(fields)


@pytest.mark.parametrize(
    "fields",
    [
        [(b"connection", b"x-drop, close"), (b"x-drop", b"1"), (b"keep", b"2")],
        [(b"keep", b"1"), (b"upgrade", b"websocket"), (b"te", b"trailers")],
        [(b"x_forwarded_client_cert", b"forged"), (b"keep", b"1")],
        [],
    ],
)
@pytest.mark.parametrize("keep_upgrade", [False, True])
def test_forwardable_given_the_names_drops_what_it_drops_without(
    fields: list[tuple[bytes, bytes]], keep_upgrade: bool
) -> None:
    strip = frozenset({b"x-forwarded-client-cert"})
    names = frozenset(n for n, _ in fields)
    assert forwardable(fields, strip=strip, keep_upgrade=keep_upgrade, names=names) == (
        forwardable(fields, strip=strip, keep_upgrade=keep_upgrade)
    )
