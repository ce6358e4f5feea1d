"""Serialising HTTP/1.1 messages (pure: values in, bytes out).

Theory of operation. A relay re-frames what it forwards: the framing of a
message we write is decided here, from the status, the request method and
the fields the caller passes, in the way h11 decides it (RFC 9112 section
6): 1xx, 204 and 304 answers and answers to HEAD carry no body;
``Transfer-Encoding: chunked`` or ``Content-Length`` frame it as given; an
answer with neither is chunked for an HTTP/1.1 client and read until close
for an HTTP/1.0 one (which then must close). A message that must close says
``Connection: close``.

:class:`BodyWriter` encodes the body of one message in its framing and
refuses to write more (or less) than a Content-Length announced: a relay
that forwarded a short body would desynchronise the next message on the
connection, so that is our bug (:class:`WriteError`), never sent.
"""

from __future__ import annotations

import http
from collections.abc import Iterable, Sequence

from proxy.http.wire import Framing, Header

_NO_BODY_STATUS = frozenset({204, 304})
_FRAMING_FIELDS = frozenset({b"connection", b"transfer-encoding", b"content-length"})
_NOT_COPIED = frozenset({b"connection", b"transfer-encoding"})  # we write our own
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class WriteError(Exception):
    """We tried to write a message its framing does not allow (a bug)."""


def reason_for(status: int, reason: bytes = b"") -> bytes:
    """``reason`` if given, else the standard phrase (``403`` -> ``Forbidden``)."""
    return reason or _REASONS.get(status, b"")


def _fields(start: bytes, headers: Iterable[Header]) -> bytes:
    """``start`` (a start line with its CRLF, or a last chunk) and the
    fields. One join, no per-field call: this runs for every message."""
    return start + b"".join([name + b": " + value + b"\r\n" for name, value in headers]) + b"\r\n"


def request_head(method: bytes, target: bytes, headers: Iterable[Header]) -> bytes:
    return _fields(method + b" " + target + b" HTTP/1.1\r\n", headers)


def response_head(status: int, reason: bytes, headers: Iterable[Header]) -> bytes:
    return _fields(b"HTTP/1.1 %d %s\r\n" % (status, reason_for(status, reason)), headers)


def request_framing(
    headers: Iterable[Header], *, names_lowered: bool = False
) -> tuple[Framing, int | None, bool]:
    """How a request we forward is framed, and whether it says close.
    ``names_lowered``: the names are lower-case already (not lowered again)."""
    framing, close = Framing.NONE, False
    length: int | None = 0
    for name, value in headers:
        lowered = name if names_lowered else name.lower()
        if lowered == b"transfer-encoding":
            framing, length = Framing.CHUNKED, None
        elif lowered == b"content-length" and framing is Framing.NONE:
            length = int(value)
            framing = Framing.LENGTH if length else Framing.NONE
        elif lowered == b"connection":
            close = close or b"close" in value.lower()
    return framing, length, close


def frame_response(
    status: int,
    headers: Sequence[Header],
    *,
    head_request: bool,
    client_http10: bool,
    keep_alive: bool,
    names_lowered: bool = False,
) -> tuple[list[Header], Framing, int | None, bool]:
    """The fields to write for a final answer, its body framing, the length
    of a LENGTH body, and whether the connection must close after it.
    ``keep_alive``: whether the request allowed another message;
    ``names_lowered``: the names are lower-case already (a relayed answer)."""
    tokens: set[bytes] = set()
    chunked = False
    length: int | None = None
    # This runs for every answer: no per-field call, only the few framing
    # fields are looked at one by one.
    names = [n for n, _ in headers] if names_lowered else [n.lower() for n, _ in headers]
    for i in [i for i, n in enumerate(names) if n in _FRAMING_FIELDS]:
        lowered, value = names[i], headers[i][1]
        if lowered == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
        elif lowered == b"transfer-encoding":
            chunked = True
        elif length is None:  # the first Content-Length
            length = int(value)
    out = [h for h, n in zip(headers, names, strict=True) if n not in _NOT_COPIED]
    close = not keep_alive or b"close" in tokens
    if status < 200 or status in _NO_BODY_STATUS:
        framing, length = Framing.NONE, 0
    elif not chunked and length is not None:
        framing = Framing.LENGTH if length else Framing.NONE
    else:
        out = [(n, v) for n, v in out if n.lower() != b"content-length"]
        length = None
        if client_http10:
            framing = Framing.UNTIL_CLOSE
            close = close or not head_request
        else:
            framing = Framing.CHUNKED
            out.append((b"Transfer-Encoding", b"chunked"))
    if head_request:
        framing = Framing.NONE  # the fields describe the GET answer; no body follows
    tokens.discard(b"keep-alive")
    if close:
        tokens.add(b"close")
    if tokens:
        out.extend([(b"Connection", t) for t in sorted(tokens)])
    return out, framing, length, close


class BodyWriter:
    """The body of one message in its framing (see the module docstring)."""

    __slots__ = ("framing", "left")

    def __init__(self, framing: Framing, length: int | None = None) -> None:
        self.framing = framing
        self.left = length or 0

    def data(self, data: bytes) -> bytes:
        if not data:
            return b""
        framing = self.framing
        if framing is Framing.CHUNKED:
            return b"%x\r\n%s\r\n" % (len(data), data)
        if framing is Framing.LENGTH:
            if len(data) > self.left:
                raise WriteError(f"{len(data)} bytes of body where {self.left} are left")
            self.left -= len(data)
            return data
        if framing is Framing.UNTIL_CLOSE:
            return data
        raise WriteError("a body on a message framed without one")

    def sent_around(self, count: int) -> None:
        """``count`` bytes of a Content-Length body went out without us."""
        if self.framing is not Framing.LENGTH or count > self.left:
            raise WriteError(f"{count} bytes sent around a body with {self.left} left")
        self.left -= count

    def end(self, trailers: Iterable[Header] = ()) -> bytes:
        if self.framing is Framing.CHUNKED:
            return _fields(b"0\r\n", trailers)
        if self.framing is Framing.LENGTH and self.left:
            raise WriteError(f"message ended {self.left} bytes short of its Content-Length")
        return b""
