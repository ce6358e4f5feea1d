"""An OAuth 2.0 token request over TLS (RFC 6749 4.4, 5.1, 5.2), on trio + h11.

Theory of operation: one POST per fetch on a fresh connection
(``Connection: close``): fetches are rare (once per token lifetime), so
pooling would only add state. The endpoint is verified like a DNS route
(proxy/tls/dns.py), with our SVID as the client certificate for RFC 8705.
The response is parsed strictly (:func:`parse_token_response`): a JSON
object with ``access_token``, ``token_type`` Bearer and ``expires_in``.

Nothing secret leaves this module in an error: messages name the endpoint,
the HTTP status and at most the RFC 6749 ``error`` code (an ASCII token the
standard defines); never the response body, the form we sent or a token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode, urlsplit

import h11
import trio

from proxy.credentials.provider import CredentialFetchError, Token
from proxy.tls.dns import DnsSide, open_dns_stream
from proxy.tls.stream import TLSHandshakeError

__all__ = ["TokenUrl", "parse_token_response", "parse_token_url", "post_form"]

MAX_RESPONSE = 64 * 1024
# RFC 6749 5.1 makes expires_in RECOMMENDED; without it we assume a short
# life rather than keep a token the server may already have revoked.
DEFAULT_EXPIRES_IN = 300
_ERROR_CODE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}$")


@dataclass(frozen=True, slots=True)
class TokenUrl:
    url: str
    host: str
    port: int
    target: str


def parse_token_url(text: str) -> TokenUrl:
    """An https URL with a host; ValueError otherwise."""
    try:
        parts = urlsplit(text)
        port = parts.port or 443
    except ValueError as exc:
        raise ValueError(f"invalid URL {text[:120]!r}: {exc}") from None
    if parts.scheme != "https":
        raise ValueError(f"token_url {text[:120]!r} must be an https URL")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError(f"token_url {text[:120]!r} needs a host and no userinfo")
    if parts.fragment:
        raise ValueError(f"token_url {text[:120]!r} must not have a fragment")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return TokenUrl(text, parts.hostname, port, target)


async def post_form(
    url: TokenUrl, form: Mapping[str, str], side: DnsSide, *, timeout: float
) -> tuple[int, bytes]:
    """POST ``form`` to ``url``; (status, body) or CredentialFetchError."""
    body = urlencode(form).encode("ascii")
    host = url.host if url.port == 443 else f"{url.host}:{url.port}"
    if ":" in url.host:
        host = f"[{url.host}]" if url.port == 443 else f"[{url.host}]:{url.port}"
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE)
    request = h11.Request(
        method="POST",
        target=url.target,
        headers=[
            ("host", host),
            ("content-type", "application/x-www-form-urlencoded"),
            ("accept", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ],
    )
    try:
        with trio.fail_after(timeout):
            stream = await open_dns_stream(url.host, url.port, side, timeout=timeout)
            async with stream:
                await stream.send_all(
                    conn.send(request)
                    + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage())
                )
                status = 0
                chunks: list[bytes] = []
                size = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    if isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > MAX_RESPONSE:
                            raise CredentialFetchError(
                                f"token endpoint {url.url}: response over {MAX_RESPONSE} bytes"
                            )
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        return status, b"".join(chunks)
    except TLSHandshakeError as exc:
        raise CredentialFetchError(
            f"token endpoint {url.url}: TLS refused ({exc.reason}: {exc.message})"
        ) from None
    except trio.TooSlowError:
        raise CredentialFetchError(
            f"token endpoint {url.url}: no answer within {timeout:g}s"
        ) from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise CredentialFetchError(
            f"token endpoint {url.url}: connection failed ({type(exc).__name__})"
        ) from None
    except h11.ProtocolError:
        raise CredentialFetchError(f"token endpoint {url.url}: bad HTTP response") from None


def _error_code(body: bytes) -> str:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    code = document.get("error") if isinstance(document, dict) else None
    if isinstance(code, str) and _ERROR_CODE.match(code):
        return f" ({code})"
    return ""


def parse_token_response(url: str, status: int, body: bytes, now: datetime) -> Token:
    """A Token from a successful response; CredentialFetchError otherwise."""
    if status != 200:
        raise CredentialFetchError(f"token endpoint {url}: HTTP {status}{_error_code(body)}")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise CredentialFetchError(f"token endpoint {url}: response is not JSON") from None
    if not isinstance(document, dict):
        raise CredentialFetchError(f"token endpoint {url}: response is not a JSON object")
    token = document.get("access_token")
    if not isinstance(token, str) or not token:
        raise CredentialFetchError(f"token endpoint {url}: no access_token in the response")
    token_type = document.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise CredentialFetchError(f"token endpoint {url}: token_type must be Bearer (RFC 6750)")
    expires_in = document.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)  # seen in the wild (older ADFS)
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not math.isfinite(expires_in)
        or not 0 < expires_in <= 366 * 86400
    ):
        raise CredentialFetchError(f"token endpoint {url}: expires_in is not a positive number")
    return Token(token, now + timedelta(seconds=float(expires_in)), now)
