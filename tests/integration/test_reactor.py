"""The epoll reactor over real loopback sockets and real TLS 1.3 handshakes.

Layout of every test: client peer <-> end A ==reactor== end B <-> target
peer, where A and B are the reactor's sockets (TLS on the socket or plain).
"""

from __future__ import annotations

import gc
import os

import pytest
import trio
import trio.testing

from proxy.runtime.reactor import SCRATCH_BYTES, Reactor, RelayResult, _Pair, open_reactor
from proxy.tls import TLSStream
from tests.integration.reactor_support import (
    _CA,
    CLIENT,
    SERVER,
    SockTls,
    read_all,
    reset,
    tcp_pair,
    tls_pair,
)
from tests.integration.tls_support import side

CLIENT_ID = "spiffe://reactor.test/agent/client"
SERVER_ID = "spiffe://reactor.test/svc/server"

Peer = trio.SocketStream | SockTls
KINDS = ["tls-plain", "plain-plain", "tls-tls", "plain-tls"]


async def layout(kind: str) -> tuple[Peer, Peer, Peer, Peer]:
    """(client peer, end A, end B, target peer)."""
    first, second = kind.split("-")
    if first == "tls":
        client, a = await tls_pair()
    else:
        client, a = await tcp_pair()
    if second == "tls":
        b, target = await tls_pair()
    else:
        b, target = await tcp_pair()
    return client, a, b, target


async def start_relay(
    nursery: trio.Nursery, reactor: Reactor, a: Peer, b: Peer, **kwargs: object
) -> tuple[RelayResult, trio.Event]:
    result, done = RelayResult(), trio.Event()

    async def run() -> None:
        await reactor.relay(a, b, result=result, **kwargs)  # type: ignore[arg-type]
        done.set()

    nursery.start_soon(run)
    return result, done


async def wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    """Wait for a reactor state with a deadline (it has no event for tests)."""
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.005)


@pytest.mark.parametrize("kind", KINDS)
async def test_bulk_both_ways_byte_exact(kind: str) -> None:
    client, a, b, target = await layout(kind)
    up, down = os.urandom(3 << 20), os.urandom(2 << 20) + b"tail"
    got: dict[str, bytes] = {}

    async def side(name: str, peer: Peer, data: bytes) -> None:
        async with trio.open_nursery() as n:

            async def send() -> None:
                await peer.send_all(data)
                await peer.send_eof()

            n.start_soon(send)
            got[name] = await read_all(peer)

    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b)
        nursery.start_soon(side, "target", target, down)
        nursery.start_soon(side, "client", client, up)
        with trio.fail_after(60):
            await done.wait()
        assert reactor.stats()["pairs"] == 0
    assert got["target"] == up and got["client"] == down
    assert (result.reason, result.bytes_up, result.bytes_down) == ("closed", len(up), len(down))
    assert result.truncated == []


@pytest.mark.parametrize("kind", ["tls-plain", "plain-tls"])
async def test_half_close_each_way(kind: str) -> None:
    """EOF from one side reaches the other while the reverse keeps flowing."""
    client, a, b, target = await layout(kind)
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b)
        await client.send_all(b"request")
        await client.send_eof()  # close_notify or FIN
        assert await read_all(target) == b"request"  # ends with the EOF we passed on
        assert not done.is_set()
        await target.send_all(b"answer after the client's EOF")
        await target.send_eof()
        assert await read_all(client) == b"answer after the client's EOF"
        with trio.fail_after(10):
            await done.wait()
    assert result.reason == "closed"

    client, a, b, target = await layout(kind)
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b)
        await target.send_all(b"early answer")
        await target.send_eof()
        assert await read_all(client) == b"early answer"
        await client.send_all(b"late request")
        await client.send_eof()
        assert await read_all(target) == b"late request"
        with trio.fail_after(10):
            await done.wait()
    assert (result.reason, result.bytes_up, result.bytes_down) == ("closed", 12, 12)


@pytest.mark.parametrize("kind", ["tls-plain", "plain-plain", "tls-tls"])
async def test_a_reset_ends_the_pair_named_after_its_side(kind: str) -> None:
    client, a, b, target = await layout(kind)
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b)
        await client.send_all(b"hello")
        assert await target.receive_some(100) == b"hello"
        reset(target.stream.socket if isinstance(target, SockTls) else target.socket)
        with trio.fail_after(10):
            await done.wait()
    assert result.reason == "target_reset"
    assert result.bytes_up == 5


async def test_tls_truncation_is_eof_and_reported() -> None:
    """A TLS peer that ends TCP without close_notify: read as EOF (as
    stunnel and ghostunnel do), passed on, and named in the result."""
    client, a, b, target = await layout("tls-plain")
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b)
        await client.send_all(b"partial")
        client.stream.socket.shutdown(trio.socket.SHUT_WR)  # FIN, no close_notify
        assert await read_all(target) == b"partial"
        await target.send_eof()
        with trio.fail_after(10):
            await done.wait()
    assert (result.reason, result.truncated) == ("closed", ["client"])


@pytest.mark.parametrize("kind", ["tls-plain", "plain-plain"])
async def test_backpressure_holds_at_most_one_buffer(kind: str) -> None:
    """A target that stops reading: the reactor stops reading the client
    (its buffered bytes stay within one scratch buffer) and resumes when the
    target reads again; nothing is lost."""
    client, a, b, target = await layout(kind)
    data = os.urandom(24 << 20)
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b)
        sending = trio.Event()

        async def send() -> None:
            await client.send_all(data)
            await client.send_eof()
            sending.set()

        nursery.start_soon(send)
        await wait_for(lambda: reactor.stats()["buffered_bytes"] > 0, "a blocked send")
        held = reactor.stats()["buffered_bytes"]
        assert 0 < held <= SCRATCH_BYTES
        assert not sending.is_set()  # the kernel buffers are full: the client is held back
        assert await read_all(target) == data
        await target.send_eof()
        with trio.fail_after(30):
            await done.wait()
    assert result.bytes_up == len(data)


async def test_a_write_timeout_ends_a_stalled_pair() -> None:
    client, a, b, _target = await layout("plain-plain")  # the target never reads
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b, write_timeout=0.3)

        async def flood() -> None:
            try:
                while True:
                    await client.send_all(b"x" * 65536)
            except trio.BrokenResourceError:
                pass

        nursery.start_soon(flood)
        with trio.fail_after(20):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert (result.reason, result.stalled) == ("write_timeout", "target")
    assert reactor.stats()["pairs"] == 0


async def test_many_concurrent_pairs() -> None:
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        results = []

        async def one(i: int) -> None:
            client, a, b, target = await layout("tls-plain" if i % 4 == 0 else "plain-plain")
            r, done = await start_relay(nursery, reactor, a, b)
            payload = os.urandom(20000 + i)
            await client.send_all(payload)
            await client.send_eof()
            assert await read_all(target) == payload
            await target.send_all(payload[::-1])
            await target.send_eof()
            assert await read_all(client) == payload[::-1]
            await done.wait()
            results.append(r)

        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                for i in range(120):
                    inner.start_soon(one, i)
        assert reactor.stats() == {
            "pairs": 0,
            "sockets": 0,
            "buffered_bytes": 0,
            "transfers": 0,
            "transferred_bytes": 0,
        }
    assert len(results) == 120 and {r.reason for r in results} == {"closed"}


async def test_cancelling_the_task_ends_the_pair() -> None:
    client, a, b, target = await layout("tls-plain")
    async with open_reactor() as reactor:
        result = RelayResult()
        with trio.move_on_after(0.2) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: reactor.relay(a, b, result=result))
                await client.send_all(b"ping")
                assert await target.receive_some(10) == b"ping"
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert result.reason == "cancelled" and result.bytes_up == 4
        assert reactor.stats()["pairs"] == 0
        # The sockets are the caller's again: still open, still usable.
        await target.send_all(b"after")
        assert isinstance(b, trio.SocketStream)
        assert await b.receive_some(10) == b"after"


async def test_the_real_tls_stream_is_a_reactor_end() -> None:
    """proxy.tls.TLSStream after its handshake (the listener's object, with
    SPIFFE verification in the handshake) is what the reactor relays."""
    connector, accepted = await tcp_pair()
    server = TLSStream(accepted, side(SERVER, (_CA,), [CLIENT_ID], server=True))
    client = TLSStream(connector, side(CLIENT, (_CA,), [SERVER_ID], server=False))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    b, target = await tcp_pair()
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, server, b)
        await client.send_all(b"through the real stream")
        await client.send_eof()
        assert await read_all(target) == b"through the real stream"
        await target.send_all(b"and back")
        await target.send_eof()
        assert await read_all(client) == b"and back"
        with trio.fail_after(10):
            await done.wait()
    assert (result.reason, result.bytes_up, result.bytes_down) == ("closed", 23, 8)


@pytest.mark.parametrize("kind", KINDS)
async def test_bytes_that_arrived_before_the_relay_are_moved(kind: str) -> None:
    """A request already in a socket (or in OpenSSL) when the pair is added
    is relayed without any new readiness: epoll reports a plain socket's
    kernel bytes, the ready list covers OpenSSL's."""
    client, a, b, target = await layout(kind)
    await client.send_all(b"early request")
    await target.send_all(b"early answer")
    # Loopback delivers at once: the bytes wait in the sockets before the pair exists.
    assert _readable(a) and _readable(b)
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        result, done = await start_relay(nursery, reactor, a, b)
        with trio.fail_after(10):
            assert await target.receive_some(100) == b"early request"
            assert await client.receive_some(100) == b"early answer"
        await client.send_eof()
        await target.send_eof()
        with trio.fail_after(10):
            await done.wait()
    assert (result.reason, result.bytes_up, result.bytes_down) == ("closed", 13, 12)


async def test_an_ended_pair_leaves_nothing_for_the_garbage_collector() -> None:
    """Whether it closed, was reset or was cancelled, an ended pair is freed
    when its task drops it: no cycle keeps its sockets and OpenSSL state
    waiting for a collection (with the collector off, none may be left)."""
    gc.collect()
    gc.disable()
    try:
        for ending in ("closed", "reset", "cancelled"):
            client, a, b, target = await layout("tls-plain")
            async with open_reactor() as reactor:
                with trio.move_on_after(5 if ending != "cancelled" else 0.2):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(reactor.relay, a, b)
                        await client.send_all(b"ping")
                        assert await target.receive_some(10) == b"ping"
                        if ending == "closed":
                            await client.send_eof()
                            await target.send_eof()
                        elif ending == "reset":
                            assert isinstance(target, trio.SocketStream)
                            reset(target.socket)
        left = [o for o in gc.get_objects() if isinstance(o, _Pair)]
        assert not left, f"{len(left)} ended pair(s) still in memory"
    finally:
        gc.enable()


def _readable(end: Peer) -> bool:
    import select

    fd = end.socket.fileno() if isinstance(end, trio.SocketStream) else end.stream.socket.fileno()
    return bool(select.select([fd], [], [], 0)[0])


async def test_openssl_bytes_reach_a_busy_reactor_without_new_readiness() -> None:
    """A TLS end whose next bytes are already decrypted inside OpenSSL (a
    record the connection's task read only in part) joins a reactor that is
    asleep on its epoll fd for other pairs: no socket will ever become
    readable for those bytes, so adding the pair itself must move them."""
    # (Its outer peers stay referenced, and so open, for the whole test.)
    _idle_client, idle_a, idle_b, _idle_target = await layout("plain-plain")
    client, a, b, target = await layout("tls-plain")
    await client.send_all(b"early request")
    assert isinstance(a, SockTls)
    with trio.fail_after(10):
        assert await a.receive_some(6) == b"early "  # the rest stays in OpenSSL
    assert not _readable(a)
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        await start_relay(nursery, reactor, idle_a, idle_b)
        await trio.testing.wait_all_tasks_blocked()  # the reactor sleeps in epoll
        result, done = await start_relay(nursery, reactor, a, b)
        with trio.fail_after(10):
            assert await target.receive_some(100) == b"request"
        await client.send_eof()
        await target.send_eof()
        with trio.fail_after(10):
            await done.wait()
        assert (result.reason, result.bytes_up) == ("closed", 7)
        nursery.cancel_scope.cancel()
