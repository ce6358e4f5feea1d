"""The upstream pool at its per-key limit: a task waiting for a connection
is woken by the checkin or the discard that frees one, whatever the order in
which the tasks run (the pool skips the condition's lock when nobody waits,
so a lost wake-up here would hang a request)."""

from __future__ import annotations

from collections.abc import Hashable

import trio
import trio.testing

from proxy.http.conn import Limits
from proxy.http.pool import UpstreamPool
from proxy.http.upstream import Upstream
from proxy.http.wire import End, Fields, Request


def _pool(connects: list[Upstream]) -> UpstreamPool:
    async def connect(key: Hashable) -> Upstream:
        ours, _theirs = trio.testing.memory_stream_pair()
        up = Upstream(ours, key, Limits())
        connects.append(up)
        return up

    return UpstreamPool(connect, max_per_key=1)


async def test_a_waiter_gets_the_connection_checked_in() -> None:
    connects: list[Upstream] = []
    pool = _pool(connects)
    first, reused = await pool.checkout("k")
    assert not reused
    got: list[tuple[Upstream, bool]] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _take(pool, got))
            await trio.testing.wait_all_tasks_blocked()
            assert not got  # at the limit: it waits
            await pool.checkin(first)
    # Never used for an exchange, it is not reusable: closed, its slot freed.
    assert len(got) == 1 and got[0][0] is connects[-1]


async def test_a_waiter_connects_anew_after_a_discard() -> None:
    connects: list[Upstream] = []
    pool = _pool(connects)
    first, _ = await pool.checkout("k")
    got: list[tuple[Upstream, bool]] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _take(pool, got))
            await trio.testing.wait_all_tasks_blocked()
            await pool.discard(first)
    assert len(got) == 1 and got[0][0] is connects[1] and not got[0][1]


async def test_a_checkin_while_the_waiter_takes_the_lock_is_not_lost() -> None:
    """The waiter has seen the pool full and is taking the condition's lock
    (a schedule point) when the connection comes back."""
    connects: list[Upstream] = []
    pool = _pool(connects)
    first, _ = await pool.checkout("k")
    got: list[tuple[Upstream, bool]] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _take(pool, got))
            # Run the checkin in the same scheduling batch as the waiter's
            # first steps: no wait_all_tasks_blocked in between.
            await pool.checkin(first)
    assert len(got) == 1


async def _take(pool: UpstreamPool, got: list[tuple[Upstream, bool]]) -> None:
    got.append(await pool.checkout("k"))


async def test_a_pooled_connection_that_closed_after_a_reuse_is_not_reused_again() -> None:
    """The pool polls a connection's socket with one poll object made at its
    first reuse; the peer closing it later is still seen at the next one."""
    peers: list[trio.SocketStream] = []
    made: list[Upstream] = []

    async def connect(key: Hashable) -> Upstream:
        ours, theirs = trio.socket.socketpair()
        peers.append(trio.SocketStream(theirs))
        made.append(Upstream(trio.SocketStream(ours), key, Limits()))
        return made[-1]

    async def exchange(up: Upstream, peer: trio.SocketStream) -> Upstream:
        await up.send(Request(b"GET", b"/", Fields([(b"host", b"h")])))
        await up.send(End())
        await peer.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        while not isinstance(await up.next_event(5.0), End):
            pass
        return up

    pool = UpstreamPool(connect)
    first, reused = await pool.checkout("k")
    assert not reused
    await pool.checkin(await exchange(first, peers[0]))
    again, reused = await pool.checkout("k")  # alive: reused, its poll object made
    assert reused and again is first and first.poller is not None
    await pool.checkin(await exchange(again, peers[0]))
    await peers[0].aclose()  # the upstream ends the idle connection
    fresh, reused = await pool.checkout("k")
    assert not reused and fresh is made[1] and len(made) == 2
