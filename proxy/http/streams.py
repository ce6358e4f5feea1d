"""Byte-stream helpers of the HTTP connections: a send and a receive under
a deadline, a broken upstream named for the audit record, and a lingering
close.

Theory of operation: most sends and many receives of an HTTP exchange
complete at once (loopback, small messages), and a trio cancel scope around
each one costs more CPU than the send itself. So each operation is tried
first without waiting (:meth:`~proxy.tls.stream.TLSStream.send_now` and
``receive_now``, or the plain socket's non-blocking call); only when it
would block does it await the stream under a ``move_on_after`` deadline, as
before (a plain socket's receive then waits for readability and repeats its
non-blocking read: SocketStream's own layers would only add calls). What
the fast path skips is trio's schedule point: one in every
:data:`_FAST_OPS_PER_YIELD` fast operations checkpoints anyway, so a
connection whose peers never make it wait (a pipelining client, a bulk
body on a fast link) cannot starve the others, and cancellation is still
seen at once (``checkpoint_if_cancelled`` on every operation).
"""

from __future__ import annotations

import os

import trio

from proxy.http.exchange import PeerError
from proxy.tls.raw_io import read_plain
from proxy.tls.stream import TLSStream

_FAST_OPS_PER_YIELD = 16
_fast_ops = 0  # fast operations since the last schedule point (counted inline: no coroutine)


def _send_plain(stream: trio.abc.Stream, data: bytes) -> int:
    if type(stream) is trio.SocketStream:
        try:
            return os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # as trio's own send_all reports it
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
    return 0


def _receive_now(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    if isinstance(stream, TLSStream):
        return stream.receive_now(max_bytes)
    return _receive_plain(stream, max_bytes)


def _receive_plain(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    if type(stream) is trio.SocketStream:
        try:
            return read_plain(stream.socket.fileno(), max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:  # read once, the error is gone: report it now
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
    return None


async def send_within(
    stream: trio.abc.Stream, data: bytes, timeout: float, on_timeout: PeerError
) -> None:
    """``send_all`` under the write timeout; a new exception like
    ``on_timeout`` when it passes."""
    global _fast_ops
    await trio.lowlevel.checkpoint_if_cancelled()
    # TLS or plain, each tried without waiting (one call less per operation).
    sent = stream.send_now(data) if isinstance(stream, TLSStream) else _send_plain(stream, data)
    if sent == len(data):
        _fast_ops += 1
        if _fast_ops >= _FAST_OPS_PER_YIELD:
            _fast_ops = 0
            await trio.lowlevel.checkpoint()
        return
    with trio.move_on_after(timeout):
        await stream.send_all(memoryview(data)[sent:])
        return
    raise _fresh(on_timeout)


async def receive_within(
    stream: trio.abc.Stream, max_bytes: int, timeout: float, on_timeout: PeerError
) -> bytes:
    """``receive_some`` under a deadline; a new exception like
    ``on_timeout`` when it passes. Transport errors pass through (the
    caller names them)."""
    global _fast_ops
    await trio.lowlevel.checkpoint_if_cancelled()
    if isinstance(stream, TLSStream):
        data = stream.receive_now(max_bytes)
    else:
        data = _receive_plain(stream, max_bytes)
    if data is not None:
        _fast_ops += 1
        if _fast_ops >= _FAST_OPS_PER_YIELD:
            _fast_ops = 0
            await trio.lowlevel.checkpoint()
        return data
    with trio.move_on_after(timeout):
        if type(stream) is trio.SocketStream:
            # What SocketStream.receive_some does, minus its layers: wait
            # until readable, then the same non-blocking read (and error
            # reading) as above. A wake-up with nothing to read waits again.
            while True:
                await trio.lowlevel.wait_readable(stream.socket)
                data = _receive_plain(stream, max_bytes)
                if data is not None:
                    return data
        return bytes(await stream.receive_some(max_bytes))
    raise _fresh(on_timeout)


def _fresh(error: PeerError) -> PeerError:
    """A new exception each time: callers pass one constant per kind of
    timeout, and raising the same instance again would chain each raise's
    traceback onto the last, keeping every timed-out connection's frames
    (and with them its streams and buffers) alive for good."""
    return PeerError(error.status, error.reason, error.message)


def upstream_broken(exc: BaseException) -> PeerError:
    """An upstream that broke mid-exchange. In TLS 1.3 a server judges our
    certificate after our side of the handshake is done, so its refusal
    arrives here, as an alert, on the first read."""
    text = f"{exc} {exc.__cause__ or ''}"
    if "alert" in text.lower():
        return PeerError(502, "upstream_refused", "the upstream refused our identity (TLS alert)")
    return PeerError(502, "upstream_reset", "the upstream connection broke")


def nothing_unread(stream: trio.abc.Stream) -> bool:
    """Whether closing ``stream`` now cannot reset: no input waits unread
    (or the peer has already ended its side). Reads without waiting; what
    it reads is dropped, as a lingering close would drop it."""
    try:
        return _receive_now(stream, 65536) in (None, b"")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return True  # gone already: nothing left to protect


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
