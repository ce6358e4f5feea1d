"""TLSStream against trio's own stream contract, over real loopback sockets
with real mutual-TLS handshakes (issue 10, deliverable 7).

``check_half_closeable_stream`` runs ``check_two_way_stream`` (and through it
``check_one_way_stream`` both ways): checkpoints, BusyResourceError for
concurrent use, ClosedResourceError after our own aclose, BrokenResourceError
once the peer has gone, cancellation, a 1 MiB duplex transfer, and TLS 1.3
half-close (send_eof sends close_notify, the other side keeps sending).
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxy.tls import TlsSide, TLSStream
from tests.integration.tls_support import hr_and_payroll, tls_pair
from tests.pki import TestCA


@pytest.fixture(scope="module")
def sides(ca_a: TestCA) -> tuple[TlsSide, TlsSide]:
    return hr_and_payroll(ca_a)


async def _connected_pair(
    server_side: TlsSide, client_side: TlsSide
) -> tuple[TLSStream, TLSStream]:
    return await tls_pair((server_side, client_side))


async def test_tls_stream_is_a_half_closeable_stream(sides: tuple[TlsSide, TlsSide]) -> None:
    async def maker() -> tuple[TLSStream, TLSStream]:
        return await _connected_pair(*sides)

    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(maker, None)


async def test_aclose_sends_close_notify_then_closes_the_socket(
    sides: tuple[TlsSide, TlsSide],
) -> None:
    """A listener only calls ``await tls.aclose()``: the peer reads a clean
    TLS EOF (close_notify), not a truncation, and the socket is closed."""
    client, server = await _connected_pair(*sides)
    await server.aclose()
    assert server.transport.socket.fileno() == -1
    assert await client.receive_some() == b""
    assert not client.truncated
    await client.aclose()


async def test_aclose_after_the_socket_was_closed_writes_nothing(
    sides: tuple[TlsSide, TlsSide],
) -> None:
    """The fd number may already belong to another connection: a TLSStream
    whose transport was closed under it must not let OpenSSL write to it."""
    client, server = await _connected_pair(*sides)
    old_fd = server.fileno
    await server.transport.aclose()
    # Linux hands out the lowest free fd: one end of a new pair gets old_fd.
    first, second = socket.socketpair()
    try:
        reused, other = (first, second) if first.fileno() == old_fd else (second, first)
        assert reused.fileno() == old_fd
        await server.aclose()
        other.setblocking(False)
        with pytest.raises(BlockingIOError):
            other.recv(100)  # nothing was written to the fd's new owner
    finally:
        first.close()
        second.close()
    assert await client.receive_some() == b""
    assert client.truncated  # TCP FIN without close_notify
    await client.aclose()
