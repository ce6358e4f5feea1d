"""Reading a message head as h11 reads it, plus the sidecar's smuggling
rules (pure): the start line from the raw bytes, framing, keep-alive and
upgrade from the fields llhttp parsed (RFC 9112 sections 3, 4, 6.1, 6.3, 9.3).
:class:`HeadRefused` carries the status a request parser answers with."""

from __future__ import annotations

import re
from typing import Final

from proxy.http.wire import Framing, Head, Header

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 5.6.2
_TARGET = rb"[\x21-\x7e]+"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") (" + _TARGET + rb") HTTP/([0-9]\.[0-9])")
_STATUS_LINE: Final = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_OWS: Final = b" \t"
# A trailer field as h11 reads one (RFC 9110 5.1, 5.5): a token, a colon,
# a value of visible characters, obs-text and inner blanks, then CRLF.
_VCHARS = rb"[\x21-\x7e\x80-\xff]+"
_FIELD_VALUE = rb"(?:" + _VCHARS + rb"(?:[ \t]+" + _VCHARS + rb")*)?"
_TRAILER_FIELD: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")[ \t]*\r\n")
_NAME_ONLY: Final = re.compile(_TOKEN)
_VALUE_ONLY: Final = re.compile(_FIELD_VALUE)
_TARGET_ONLY: Final = re.compile(_TARGET)
_NO_BODY_STATUS: Final = frozenset({204, 304})
_FRAMING_FIELDS: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"host", b"upgrade", b"expect"}
)


class HeadRefused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def request_head(line: bytes, headers: list[Header]) -> tuple[Head, bool]:
    """The request head for a raw request line and llhttp's fields, and
    whether it waits for ``100 Continue``."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise HeadRefused(400, "bad_request", "malformed request line")
    method, target, version = match.groups()
    if version[0] != 49:  # b"1"
        raise HeadRefused(505, "http_version_not_supported", "only HTTP/1.x is spoken here")
    head = Head(version=version, headers=headers, framing=Framing.NONE)
    head.method = method
    head.target = target
    expect = _frame(head, True, False)
    if method == b"CONNECT":
        if head.framing is not Framing.NONE:
            raise HeadRefused(400, "bad_request", "CONNECT with a body")
        head.upgrade = True
    return head, expect


def response_head(line: bytes, headers: list[Header], head_request: bool) -> Head:
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise HeadRefused(400, "bad_request", "malformed status line")
    version, code, reason = match.groups()
    if version[0] != 49:
        raise HeadRefused(505, "http_version_not_supported", "only HTTP/1.x is spoken here")
    head = Head(version=version, headers=headers, framing=Framing.NONE)
    head.status = int(code)
    head.reason = reason or b""
    if head.status < 100:
        raise HeadRefused(400, "bad_request", "status code below 100")
    _frame(head, False, head_request)
    return head


def _frame(head: Head, request: bool, head_request: bool) -> bool:
    """Framing, keep-alive, upgrade and names, as h11 reads them, plus
    today's smuggling rules (RFC 9112 sections 6.1, 6.3, 9.3)."""
    length: bytes | None = None
    chunked = False
    hosts = 0
    close = upgrade_token = upgrade_field = expect = False
    # Lowered once here: the header rules, the writer and tracing read these.
    fields = head.lowered = [(name.lower(), value) for name, value in head.headers]
    # One set lookup per field; only the few framing fields go further.
    for lname, value in [f for f in fields if f[0] in _FRAMING_FIELDS]:
        if lname == b"content-length":
            if length is not None:
                raise HeadRefused(400, "bad_request", "duplicated Content-Length")
            length = value
        elif lname == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                raise HeadRefused(
                    501,
                    "unsupported_transfer_encoding",
                    "only Transfer-Encoding: chunked is supported",
                )
            chunked = True
        elif lname == b"connection":
            for token in value.lower().split(b","):
                token = token.strip(_OWS)
                if token == b"close":
                    close = True
                elif token == b"upgrade":
                    upgrade_token = True
        elif lname == b"host":
            hosts += 1
        elif lname == b"upgrade":
            upgrade_field = True
        elif value.lower() == b"100-continue":  # Expect
            expect = True
    head.names = frozenset([name for name, _ in fields])
    if length is not None and chunked:
        raise HeadRefused(400, "bad_request", "both Content-Length and Transfer-Encoding")
    if length is not None and not length.isdigit():
        raise HeadRefused(400, "bad_request", "bad Content-Length")
    http11 = head.version == b"1.1"
    head.keep_alive = http11 and not close
    # A response switches protocols only with 101 (see _after_head).
    head.upgrade = request and upgrade_token and upgrade_field
    if request:
        if hosts > 1 or (http11 and hosts == 0):
            raise HeadRefused(400, "bad_request", "a request needs exactly one Host field")
        expect = expect and http11
    status = head.status
    if not request and (status < 200 or status in _NO_BODY_STATUS or head_request):
        head.framing = Framing.NONE
    elif chunked:
        head.framing = Framing.CHUNKED
    elif length is not None:
        head.content_length = int(length)
        head.framing = Framing.LENGTH if head.content_length else Framing.NONE
    elif not request:
        head.framing = Framing.UNTIL_CLOSE
        head.keep_alive = False
    return expect


def trailer_field(line: bytes) -> Header:
    """One trailer line (CRLF included) as a field, checked as h11 checks one."""
    field = _TRAILER_FIELD.fullmatch(line)
    if field is None:
        raise HeadRefused(400, "bad_request", "malformed trailer field")
    return field[1], field[2]


def writable_field(name: bytes, value: bytes) -> bool:
    """Whether a field we add ourselves passes the grammar we hold a peer's
    fields to (no surrounding blanks: we write the value as given)."""
    return bool(_NAME_ONLY.fullmatch(name) and _VALUE_ONLY.fullmatch(value))


def writable_target(target: bytes) -> bool:
    return _TARGET_ONLY.fullmatch(target) is not None
