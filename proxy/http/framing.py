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


def find_head_end(buffer: bytes) -> int | None:
    """Index just past the CRLFCRLF that ends the head, if it is here yet."""
    end = buffer.find(b"\r\n\r\n")
    return None if end < 0 else end + 4


def check_partial_head(buffer: bytes, max_header_bytes: int) -> None:
    """Problems visible before the head is complete."""
    if _BARE_LF.search(buffer):
        raise HeadError(400, "bad_request", "bare LF in request head")
    if len(buffer) > max_header_bytes:
        raise HeadError(431, "header_too_large", f"request head over {max_header_bytes} bytes")


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
