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
# Fields that must never come from a trailer section: they frame, route or
# authenticate the message, or are ours to set (RFC 9110 6.5.1). A backend
# that merges trailers into the header map would otherwise take them as
# headers the client never could have sent in the head.
_TRAILER_FORBIDDEN = frozenset(
    {
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"host",
        b"expect",
        b"range",
        b"authorization",
        b"cookie",
        b"set-cookie",
        b"www-authenticate",
        b"cache-control",
        b"max-forwards",
        b"x-request-id",
    }
)
XFCC = b"x-forwarded-client-cert"
REQUEST_ID = b"x-request-id"
_REQUEST_ID_OK = re.compile(rb"^[!-~]{1,200}$")


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def fold(name: bytes) -> bytes:
    """A field name as a CGI/WSGI backend sees it: ``X_Spiffe_Id`` and
    ``x-spiffe-id`` are the same ``HTTP_X_SPIFFE_ID`` there, so our rules
    compare names this way (h11 has already lower-cased them)."""
    return name.lower().replace(b"_", b"-") if b"_" in name else name.lower()


def forwardable(
    headers: Sequence[Header],
    *,
    strip: frozenset[bytes] = frozenset(),
    keep_upgrade: bool = False,
    names: frozenset[bytes] | None = None,
) -> list[Header]:
    """Headers to pass on: without hop-by-hop fields, fields the Connection
    header names, and ``strip`` (identity headers we set ourselves). Framing
    (Content-Length, or chunked) is re-added by the caller from h11's view.
    ``names``, when known, is the set of the names (no Connection field
    there: none to read)."""
    if names is None or b"connection" in names:
        listed = connection_tokens(headers) - _PROTECTED
    else:
        listed = set()
    # One comprehension, no call per field (this runs for every message):
    # ``strip`` always goes; hop-by-hop and listed fields go, except
    # Upgrade when the switch is forwarded.
    hop = HOP_BY_HOP | listed
    if keep_upgrade:
        hop = hop - {b"upgrade"}
    drop = hop | strip
    out = [h for h in headers if h[0] not in drop and (b"_" not in h[0] or _unfolded(h[0], strip))]
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def _unfolded(name: bytes, strip: frozenset[bytes]) -> bool:
    """An underscore spelling of a field we act on is dropped, never
    forwarded: the backend may fold it into ours (issue: forged XFCC)."""
    folded = fold(name)
    return folded not in strip and folded not in HOP_BY_HOP and folded not in _PROTECTED


def trailer_fields(
    trailers: Sequence[Header], *, strip: frozenset[bytes] = frozenset()
) -> list[Header]:
    """The trailer fields a relay passes on: none that frames, routes or
    authenticates the message, no hop-by-hop field, none of our identity
    headers (``strip``, compared folded as in :func:`forwardable`)."""
    return [
        (name, value)
        for name, value in trailers
        if (folded := fold(name)) not in strip
        and folded not in HOP_BY_HOP
        and folded not in _TRAILER_FORBIDDEN
        and folded != XFCC
    ]


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
