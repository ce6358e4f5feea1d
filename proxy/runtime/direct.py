"""Large HTTP answers moved by the reactor: the runtime's ``DirectBody``.

Theory of operation: an HTTP session parses every head and decides every
exchange in its own trio task, but the body of a large Content-Length
answer needs no parsing (its bytes are opaque to llhttp too), only
moving. So once the relay has sent the head and everything the parser
held, it hands the two streams and the byte count to the process's epoll
reactor (:meth:`~proxy.runtime.reactor.Reactor.transfer`), which moves
them socket to socket through its one scratch buffer, SSL_read and
SSL_write through cffi, while the task sleeps; then the task takes the
streams back and goes on with the exchange (the last byte, the End, the
audit record, the pool). Deadlines stay the exchange's: the write timeout
and the response timeout (no byte from the upstream for that long).

Streams are handed off only when nothing else holds them: a plain
``trio.SocketStream``, or a :class:`~proxy.tls.TLSStream` that is
:attr:`~proxy.tls.TLSStream.idle`. Afterwards each TLSStream learns what
the reactor saw on its OpenSSL connection (a reset, a truncation), as
after a TCP relay.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from proxy.http.relay import Moved
from proxy.runtime.reactor import Reactor, RelayResult
from proxy.tls import TLSStream


def _handable(stream: trio.abc.Stream) -> bool:
    return type(stream) is trio.SocketStream or (isinstance(stream, TLSStream) and stream.idle)


async def direct_body(
    reactor_of: Callable[[], Reactor | None],
    upstream: trio.abc.Stream,
    client: trio.abc.Stream,
    count: int,
    write_timeout: float,
    idle_timeout: float,
) -> Moved | None:
    """Move ``count`` bytes from ``upstream`` to ``client`` with the
    process's reactor (``reactor_of()``); None when there is none or a
    stream cannot be handed off (the caller moves the bytes itself)."""
    reactor = reactor_of()
    if reactor is None or not (_handable(upstream) and _handable(client)):
        return None
    assert isinstance(upstream, trio.SocketStream | TLSStream)
    assert isinstance(client, trio.SocketStream | TLSStream)
    result = RelayResult()
    try:
        await reactor.transfer(
            upstream,
            client,
            count,
            names=("upstream", "client"),
            write_timeout=write_timeout,
            idle_timeout=idle_timeout,
            result=result,
        )
    finally:
        for stream, name in ((upstream, "upstream"), (client, "client")):
            if isinstance(stream, TLSStream):
                stream.released(
                    broken=result.reason == f"{name}_reset", truncated=name in result.truncated
                )
    return Moved(result.bytes_up, result.reason, result.detail)
