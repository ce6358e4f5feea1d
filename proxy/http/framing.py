"""Strict checks on raw HTTP/1.1 request heads and chunked framing (pure).

h11 is lenient where a proxy must not be: it accepts bare LF line endings,
unfolds obs-fold lines, and merges duplicate Content-Length fields. Two
parsers that disagree about where a message ends are how request smuggling
happens, so a head that any reasonable parser could read two ways is a 400
before h11 sees it (RFC 9112 sections 2.2, 5.2, 6.3). We check the raw bytes
h11 has buffered but not yet consumed (``Connection.trailing_data``), which
for a connection waiting on a request is exactly the next head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclass(frozen=True)
class HeadError(Exception):
    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return self.message


class HeadScanner:
    """Finds the end of one head in bytes that arrive in pieces.

    Each byte is looked at a bounded number of times whatever the pieces'
    sizes: a head sent one byte per TLS record costs linear work, not the
    quadratic work of rescanning the whole buffer per piece. A head that
    grows past ``max_header_bytes`` is refused before it is complete, so the
    work per head is bounded by the limit. ``scanned`` counts the bytes
    looked at (tests hold it to the bound).
    """

    __slots__ = ("_buffer", "_lf_from", "end", "max_header_bytes", "scanned")

    def __init__(self, max_header_bytes: int) -> None:
        self.max_header_bytes = max_header_bytes
        self._buffer = bytearray()
        self._lf_from = 0  # bare-LF check: everything before this is clean
        self.end: int | None = None  # just past the CRLFCRLF once found
        self.scanned = 0

    def feed(self, data: bytes) -> int | None:
        """Add ``data``; the head's end once it is here (else None). Raises
        :class:`HeadError` for a bare LF in the head or an oversized head."""
        if self.end is not None:
            return self.end
        buffer = self._buffer
        start = max(0, len(buffer) - 3)  # a CRLFCRLF may straddle two pieces
        buffer += data
        found = buffer.find(b"\r\n\r\n", start)
        limit = len(buffer) if found < 0 else found + 4
        self.scanned += limit - start
        lf = buffer.find(b"\n", self._lf_from, limit)
        while lf >= 0:
            if lf == 0 or buffer[lf - 1] != 0x0D:
                raise HeadError(400, "bad_request", "bare LF in request head")
            lf = buffer.find(b"\n", lf + 1, limit)
        self._lf_from = limit
        if found < 0:
            if len(buffer) > self.max_header_bytes:
                raise HeadError(
                    431, "header_too_large", f"request head over {self.max_header_bytes} bytes"
                )
            return None
        self.end = found + 4
        return self.end

    @property
    def head(self) -> bytes:
        """The complete raw head (only once :attr:`end` is set)."""
        assert self.end is not None
        return bytes(self._buffer[: self.end])


def check_head(head: bytes, max_header_bytes: int, max_headers: int) -> None:
    """Checks on a complete raw head (request line, fields, final CRLFCRLF)."""
    if len(head) > max_header_bytes:
        raise HeadError(431, "header_too_large", f"request head over {max_header_bytes} bytes")
    body = head[:-4]
    if _BARE_LF.search(body):
        raise HeadError(400, "bad_request", "bare LF in request head")
    if _BARE_CR.search(body):
        raise HeadError(400, "bad_request", "bare CR in request head")
    lines = body.split(b"\r\n")
    fields = lines[1:]
    if len(fields) > max_headers:
        raise HeadError(431, "header_too_large", f"more than {max_headers} header fields")
    content_length = 0
    transfer_encoding = False
    for line in fields:
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "bad_request", "obsolete line folding in request head")
        name, sep, value = line.partition(b":")
        if not sep:
            raise HeadError(400, "bad_request", "header field without ':'")
        lowered = name.lower()
        if lowered == b"content-length":
            content_length += 1
            if b"," in value:
                raise HeadError(400, "bad_request", "Content-Length with a list of values")
        elif lowered == b"transfer-encoding":
            transfer_encoding = True
    if content_length > 1:
        raise HeadError(400, "bad_request", "duplicated Content-Length")
    if content_length and transfer_encoding:
        raise HeadError(400, "bad_request", "both Content-Length and Transfer-Encoding")


def check_chunked_buffer(pending: bytes) -> None:
    """Called when h11 wants more data inside a chunked body. h11 consumes
    chunk data as it arrives, so what it still holds starts at a chunk-size
    line or at the CRLF after chunk data; a LF there without its CR is a
    framing error that h11 would otherwise wait on forever."""
    lf = pending.find(b"\n")
    if lf == 0 or (lf > 0 and pending[lf - 1 : lf] != b"\r"):
        raise HeadError(400, "bad_request", "bad chunk framing (bare LF)")
