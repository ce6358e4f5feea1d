"""connect_tcp's own literal-address connect: the same stream and the same
refusal texts as trio's socket connect, which it stands in for."""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.netaddr import HostPort
from proxy.runtime.l4 import connect_tcp


def _closed_port(family: int, host: str) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = [(socket.AF_INET, "127.0.0.1")] + (
    [(socket.AF_INET6, "::1")] if _has_ipv6_loopback() else []
)


@pytest.mark.parametrize(("family", "host"), FAMILIES)
async def test_a_literal_target_connects(family: int, host: str) -> None:
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    with listener:
        await listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        stream = await connect_tcp(HostPort(host, port), 5)
        assert isinstance(stream, trio.SocketStream)
        async with stream:
            accepted, _ = await listener.accept()
            with accepted:
                assert stream.socket.getpeername()[:2] == (host, port)
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                await stream.send_all(b"ping")
                assert await accepted.recv(4) == b"ping"


@pytest.mark.parametrize(("family", "host"), FAMILIES)
async def test_a_refused_literal_reads_as_trios_connect_would(family: int, host: str) -> None:
    port = _closed_port(family, host)
    result = await connect_tcp(HostPort(host, port), 5)
    assert isinstance(result, tuple)
    # What the audit record said before: trio's own socket connect.
    with trio.socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(OSError) as refused:
        await sock.connect((host, port))
    assert result == ("target_unreachable", str(refused.value.strerror or refused.value))


async def test_a_literal_connect_honours_a_cancelled_scope() -> None:
    port = _closed_port(socket.AF_INET, "127.0.0.1")
    with trio.CancelScope() as scope:
        scope.cancel()
        await connect_tcp(HostPort("127.0.0.1", port), 5)
        pytest.fail("connect_tcp did not raise Cancelled")  # pragma: no cover
    assert scope.cancelled_caught
