"""Header rules for relayed messages (pure): hop-by-hop fields (RFC 9110,
7.6.1), identity headers, X-Forwarded-Client-Cert and request ids."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence

Header = tuple[bytes, bytes]

# Connection-specific fields a proxy never forwards (RFC 9110 7.6.1 names
# Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade);
# Proxy-Authorization is meant for us, never for the upstream.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# A client may not use Connection to make us drop the fields that frame or
# route the message.
_PROTECTED = frozenset({b"host", b"content-length"})
XFCC = b"x-forwarded-client-cert"
REQUEST_ID = b"x-request-id"
_REQUEST_ID_OK = re.compile(rb"^[!-~]{1,200}$")


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def forwardable(
    headers: Sequence[Header],
    *,
    strip: frozenset[bytes] = frozenset(),
    keep_upgrade: bool = False,
) -> list[Header]:
    """Headers to pass on: without hop-by-hop fields, fields the Connection
    header names, and ``strip`` (identity headers we set ourselves). Framing
    (Content-Length, or chunked) is re-added by the caller from h11's view."""
    listed = connection_tokens(headers) - _PROTECTED
    out: list[Header] = []
    for name, value in headers:
        if name in strip:
            continue
        if name == b"upgrade" and keep_upgrade:
            out.append((name, value))
            continue
        if name in HOP_BY_HOP or name in listed:
            continue
        out.append((name, value))
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def is_chunked(headers: Iterable[Header]) -> bool:
    return any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers)


def has_body_framing(headers: Iterable[Header]) -> bool:
    return any(n in (b"content-length", b"transfer-encoding") for n, _ in headers)


def xfcc_value(by: str, leaf_sha256_hex: str, uri: str) -> bytes:
    """Envoy's X-Forwarded-Client-Cert element. SPIFFE IDs cannot contain
    ',', ';' or '=' so no quoting is needed."""
    return f"By={by};Hash={leaf_sha256_hex};URI={uri}".encode()


# A random per-process prefix and a counter: unique without a getrandom()
# syscall per request (uuid4 makes one).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id_from(headers: Iterable[Header]) -> tuple[str, bool]:
    """The client's X-Request-Id when it is sane, else a new one. The bool
    says whether we made it."""
    for name, value in headers:
        if name == REQUEST_ID and _REQUEST_ID_OK.match(value):
            return value.decode("ascii"), False
    return new_request_id(), True


def header_value(headers: Iterable[Header], wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None


def header_map(headers: Iterable[Header]) -> dict[str, str]:
    """Lower-cased names (h11 gives them so) to values, as text, for policy."""
    return {n.decode("latin-1"): v.decode("latin-1") for n, v in headers}
