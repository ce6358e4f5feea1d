"""The parts of :class:`~proxy.http.llhttp.LlhttpParser` that are not its
message walk: where a chunked body is (:class:`Chunks`) and what llhttp
calls back (:class:`Callbacks`). They set the parser's own state, as its
methods would; kept apart only for the module's length."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from proxy.http.wire import Body

if TYPE_CHECKING:
    from proxy.http.llhttp import LlhttpParser


class Chunks:
    """Where a chunked body ends, found line by line (llhttp checks the bytes)."""

    __slots__ = ("left", "line", "state", "trailer_bytes")

    SIZE, DATA, DATA_CRLF, TRAILER = range(4)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.state = Chunks.SIZE
        self.left = 0
        self.line = b""
        self.trailer_bytes = 0


class Callbacks:
    """What llhttp calls back: only these (no on_header: the fields are read
    from the raw head once llhttp checked it). A weak reference to the
    parser, which feeds llhttp and so is alive whenever these run: llhttp
    holding the parser would make a cycle per connection that only the
    garbage collector frees (its passes: 2-4% of a new agent connection's time)."""

    __slots__ = ("_parser",)

    def __init__(self, parser: LlhttpParser) -> None:
        self._parser = weakref.ref(parser)

    def on_headers_complete(self) -> None:
        parser = self._parser()
        if parser is not None:
            parser._in_trailers = True  # llhttp took the whole head

    def on_body(self, data: bytes) -> None:
        parser = self._parser()
        if parser is not None:
            parser.expects_continue = False
            parser._events.append(Body(data))

    def on_message_complete(self) -> None:
        parser = self._parser()
        if parser is not None:
            parser._message_complete = True
