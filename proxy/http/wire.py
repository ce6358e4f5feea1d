"""The seam between HTTP/1.1 parsers and the exchange (pure, no I/O).

The exchange (the per-request state machine) never names a parser. It feeds
bytes to a :class:`MessageParser` and reads :class:`Head`, :class:`Body` and
:class:`End` events back, so h11 (the strict oracle) and llhttp (the hot
path, through httptools) are interchangeable behind it. Both must give the
same events and the same accept/reject answer for the same bytes; the
differential fuzz test holds them to that.

Errors are split as h11 splits them: :class:`ParseError` means *the peer
did it* (malformed or oversized input: answer with ``status`` and close);
anything else raised by a parser is a bug of ours.

Header names are kept as received on the wire (case preserved) so a relay
can forward them unchanged; :attr:`Head.names` gives the lower-cased names
once, for rules that match on them. Values have surrounding optional
whitespace removed (RFC 9110 section 5.5).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Protocol

Header = tuple[bytes, bytes]
Role = Literal["request", "response"]


class Framing(enum.Enum):
    """How the message body is delimited (RFC 9112 section 6.3)."""

    NONE = "none"  # no body: Content-Length: 0, a GET without framing, 204/304, HEAD answer
    LENGTH = "length"  # Content-Length: N
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    UNTIL_CLOSE = "until_close"  # a response read until the connection closes


@dataclass(slots=True)
class Head:
    """A request head (``method``/``target`` set, ``status`` 0) or a response
    head (``status``/``reason`` set, ``method``/``target`` empty)."""

    version: bytes  # b"1.1" or b"1.0"
    headers: list[Header]
    framing: Framing
    content_length: int | None = None  # with Framing.LENGTH
    method: bytes = b""
    target: bytes = b""
    status: int = 0
    reason: bytes = b""
    keep_alive: bool = True  # what the message itself allows (version, Connection)
    upgrade: bool = False  # Connection: upgrade with an Upgrade field (or CONNECT)
    names: frozenset[bytes] = field(default=frozenset())  # lower-cased field names
    # ``headers`` with lower-cased names, in order, when the parser made
    # them already (llhttp does; see :func:`lowered`): lowered once per head.
    # Derived from ``headers``, so no part of a head's equality.
    lowered: list[Header] | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(slots=True)
class End:
    """End of one message; ``trailers`` holds a chunked body's trailer fields."""

    trailers: list[Header] = field(default_factory=list)


def lowered(head: Head) -> list[Header]:
    """``head``'s fields with lower-cased names (made once, by the parser
    when it could)."""
    if head.lowered is None:
        head.lowered = [(name.lower(), value) for name, value in head.headers]
    return head.lowered


class Fields(list[Header]):
    """A message's fields as ``(lower-cased name, value)`` pairs, in order:
    how rules and helpers read them (as h11's ``Headers`` iterate, without
    its per-item cost). :meth:`raw_items` keeps the names as received, for
    the bytes a relay writes.

    Built from names already lower-cased (``lowered``) and the same fields
    as spelled (``raw``; None: the lowered ones are the spelling)."""

    __slots__ = ("_raw",)

    def __init__(self, lowered: list[Header], raw: list[Header] | None = None) -> None:
        super().__init__(lowered)
        self._raw = lowered if raw is None else raw

    def raw_items(self) -> list[Header]:
        return self._raw


@dataclass(slots=True)
class Request:
    """A request head as the session, the routers and the upstream writer
    use it: already checked by the parser (or built by us and checked where
    we add to it, :func:`proxy.http.routing.upstream_request_for`)."""

    method: bytes
    target: bytes
    headers: Fields
    http_version: bytes = b"1.1"
    # The lower-cased field names, when the parser gave them (Head.names):
    # a rule that asks whether a field is there need not walk the fields.
    names: frozenset[bytes] | None = None


@dataclass(slots=True)
class Answer:
    """The head of an answer we give ourselves (an error, a denial, an
    agent protocol's verdict, ``100 Continue``); the client's framing is
    decided when it is written (:func:`proxy.http.writer.frame_response`)."""

    status: int
    reason: bytes
    headers: list[Header]


class NeedData(enum.Enum):
    """The parser needs more bytes before it can say anything more."""

    NEED_DATA = "need_data"


NEED_DATA = NeedData.NEED_DATA
Event = Head | Body | End


class ParseError(Exception):
    """The peer sent something we refuse. ``status`` is the answer to give
    (400, 413, 431, 501...) and ``reason`` the audit reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ParserLimits:
    max_header_bytes: int = 65536
    max_headers: int = 100


class MessageParser(Protocol):
    """One direction of one connection, reused across keep-alive messages.

    ``feed(b"")`` signals end of input. ``next_event`` returns one event or
    ``NEED_DATA``; it raises :class:`ParseError` for input it refuses, and
    once it has raised, the parser is dead. After :class:`End`, the parser
    returns ``NEED_DATA`` until :meth:`start_next_cycle` is called, so bytes
    that arrive early (pipelining) are kept, not parsed into the next
    message behind the caller's back. ``for_head_request()`` tells a
    response parser that the request was HEAD (no body follows).
    """

    role: Role

    def feed(self, data: bytes) -> None: ...

    def next_event(self) -> Event | NeedData: ...

    def start_next_cycle(self) -> None: ...

    def for_head_request(self) -> None: ...

    @property
    def buffered(self) -> bytes:
        """Bytes fed but not yet consumed (the start of an upgraded stream)."""
        ...

    def body_unbuffered(self) -> int:
        """Bytes of the current Content-Length body that were not fed yet,
        once everything fed is handed out (0 otherwise, or if this parser
        must see every body byte)."""
        ...

    def skip_body(self, count: int) -> None:
        """``count`` of those bytes went around the parser (a reactor moved
        them); the body ends ``count`` bytes sooner."""
        ...
