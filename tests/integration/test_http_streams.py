"""The HTTP path's send and receive without a cancel scope when they need
not wait (proxy.http.streams), over real loopback TCP and real mutual TLS:
the bytes are the same as through trio's own calls, a reset is still a
broken stream (never a clean end), a stalled peer still hits the deadline,
and a connection whose peers never make it wait still lets others run."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from proxy.http.conn import RECV_BYTES as _RECV
from proxy.http.exchange import PeerError
from proxy.http.streams import receive_within, send_within
from proxy.tls import TlsSide
from tests.integration.tls_support import hr_and_payroll, tcp_pair, tls_pair
from tests.pki import TestCA

_TIMEOUT = PeerError(0, "write_timeout", "stalled")


@pytest.fixture(scope="module")
def sides(ca_a: TestCA) -> tuple[TlsSide, TlsSide]:
    return hr_and_payroll(ca_a)


async def _exchange(a: trio.abc.Stream, b: trio.abc.Stream, chunk: int = 65536) -> None:
    """Small and large messages both ways, byte for byte."""
    for size in (1, 100, 70_000, 3_000_000):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        got = bytearray()

        async def read(into: bytearray = got, want: int = size) -> None:
            while len(into) < want:
                data = await receive_within(b, chunk, 10, _TIMEOUT)
                assert data, "early end"
                into += data

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await send_within(a, payload, 10, _TIMEOUT)
        assert bytes(got) == payload


@pytest.mark.parametrize("chunk", [65536, _RECV])
async def test_plain_tcp_bytes_arrive_unchanged(chunk: int) -> None:
    a, b = await tcp_pair()
    await _exchange(a, b, chunk)
    await _exchange(b, a, chunk)
    await a.aclose()
    assert await receive_within(b, 100, 10, _TIMEOUT) == b""
    await b.aclose()


@pytest.mark.parametrize("chunk", [65536, _RECV])
async def test_tls_bytes_arrive_unchanged(sides: tuple[TlsSide, TlsSide], chunk: int) -> None:
    a, b = await tls_pair(sides)
    await _exchange(a, b, chunk)
    await _exchange(b, a, chunk)
    await a.aclose()
    assert await receive_within(b, 100, 10, _TIMEOUT) == b""
    assert not b.truncated
    await b.aclose()


async def test_a_reset_is_a_broken_stream_not_an_end() -> None:
    a, b = await tcp_pair()
    await send_within(b, b"hello", 10, _TIMEOUT)
    await trio.testing.wait_all_tasks_blocked()
    # SO_LINGER 0: close sends RST, and our unread "hello" makes sure of it.
    a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.socket.close()
    with trio.fail_after(10):
        while True:
            try:
                data = await receive_within(b, 100, 10, _TIMEOUT)
            except trio.BrokenResourceError:
                break
            assert data, "a reset was read as a clean end of stream"
    await b.aclose()


async def test_a_peer_that_stops_reading_hits_the_write_deadline(
    sides: tuple[TlsSide, TlsSide], autojump_clock: trio.testing.MockClock
) -> None:
    a, b = await tls_pair(sides)
    with pytest.raises(PeerError) as caught:
        while True:  # b never reads: the buffers fill, then the 60 s deadline
            await send_within(a, b"x" * 65536, 60, _TIMEOUT)
    assert caught.value.reason == "write_timeout"
    await a.aclose()
    await b.aclose()


async def test_each_timeout_is_a_new_exception_that_keeps_nothing_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Callers pass one constant per kind of timeout. Raising that instance
    itself would chain every raise's traceback onto the last, and with it
    the frames, streams and buffers of every connection that ever timed
    out: a leak that grows with each stalled peer."""
    a, b = await tcp_pair()
    raised = []
    for _ in range(3):
        with pytest.raises(PeerError) as caught:
            await receive_within(b, 100, 5, _TIMEOUT)  # a never sends
        raised.append(caught.value)
    assert all(e is not _TIMEOUT for e in raised)
    assert [(e.status, e.reason, e.message) for e in raised] == [
        (_TIMEOUT.status, _TIMEOUT.reason, _TIMEOUT.message)
    ] * 3
    assert len({id(e) for e in raised}) == 3
    assert _TIMEOUT.__traceback__ is None
    await a.aclose()
    await b.aclose()


async def test_a_peer_that_never_makes_us_wait_does_not_starve_others() -> None:
    """Every receive is served from the kernel at once (no wait, no
    cancel scope): other tasks must still run between them."""
    a, b = await tcp_pair()
    await send_within(a, b"x" * 20_000, 10, _TIMEOUT)  # fits the buffers
    await trio.testing.wait_all_tasks_blocked()
    other_ran = trio.Event()
    reads_before_other = 0

    async def other() -> None:
        other_ran.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        while not other_ran.is_set():
            assert await receive_within(b, 1, 10, _TIMEOUT) == b"x"
            reads_before_other += 1
            assert reads_before_other < 1000, "the fast path never yielded"
    await a.aclose()
    await b.aclose()


async def test_a_reset_while_waiting_on_a_plain_socket_is_a_broken_stream() -> None:
    """A plain-socket receive that has to wait waits for readability and
    then reads as the fast path does: a reset that arrives during the wait
    is still a broken stream, and bytes that arrive end it with them."""
    a, b = await tcp_pair()
    got: list[bytes] = []

    async def read() -> None:
        got.append(await receive_within(b, 100, 10, _TIMEOUT))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()  # b waits: nothing sent yet
        await send_within(a, b"late", 10, _TIMEOUT)
    assert got == [b"late"]
    seen: list[str] = []

    async def read_until_broken() -> None:
        try:
            await receive_within(b, 100, 10, _TIMEOUT)
        except trio.BrokenResourceError:
            seen.append("broken")
        else:
            seen.append("data")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_broken)
            await trio.testing.wait_all_tasks_blocked()
            await send_within(b, b"unread", 10, _TIMEOUT)  # so a's close sends RST
            a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.socket.close()
    assert seen == ["broken"]
    await b.aclose()


@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_a_small_read_allocates_what_it_read_not_the_read_size(
    kind: str, sides: tuple[TlsSide, TlsSide]
) -> None:
    """The HTTP connections read up to 256 KiB at a time. os.read (and
    pyOpenSSL's recv) allocate that much first: past glibc's mmap threshold
    that is an mmap, mremap and munmap per read, five times the cost of a
    small read. Reads go through one reused buffer: a 200-byte read
    allocates about 200 bytes."""
    import tracemalloc

    a, b = await (tcp_pair() if kind == "plain" else tls_pair(sides))
    await send_within(a, b"x" * 200, 10, _TIMEOUT)
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(b.socket if kind == "plain" else b.fileno)  # type: ignore[attr-defined]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        data = await receive_within(b, _RECV, 10, _TIMEOUT)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert data == b"x" * 200
    assert peak < 16384, peak
    await a.aclose()
    await b.aclose()
