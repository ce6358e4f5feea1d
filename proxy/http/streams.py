"""Byte-stream helpers of the HTTP connections: a send under a deadline, a
broken upstream named for the audit record, and a lingering close."""

from __future__ import annotations

import trio

from proxy.http.exchange import PeerError


async def send_within(
    stream: trio.abc.Stream, data: bytes, timeout: float, on_timeout: PeerError
) -> None:
    """``send_all`` under the write timeout."""
    with trio.move_on_after(timeout):
        await stream.send_all(data)
        return
    raise on_timeout


def upstream_broken(exc: BaseException) -> PeerError:
    """An upstream that broke mid-exchange. In TLS 1.3 a server judges our
    certificate after our side of the handshake is done, so its refusal
    arrives here, as an alert, on the first read."""
    text = f"{exc} {exc.__cause__ or ''}"
    if "alert" in text.lower():
        return PeerError(502, "upstream_refused", "the upstream refused our identity (TLS alert)")
    return PeerError(502, "upstream_reset", "the upstream connection broke")


async def linger_close(
    stream: trio.abc.Stream, *, seconds: float = 2.0, max_bytes: int = 1 << 20
) -> None:
    """Half-close, then read and drop what the client still sends for a
    moment before closing. Closing a socket with unread input makes the
    kernel send RST, which can destroy the error response we just wrote
    before the client reads it (RFC 9112 9.6)."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        drained = 0
        with trio.move_on_after(seconds):
            while drained < max_bytes:
                data = await stream.receive_some(65536)
                if not data:
                    break
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass
