"""The upstream pool at its per-key limit: a task waiting for a connection
is woken by the checkin or the discard that frees one, whatever the order in
which the tasks run (the pool skips the condition's lock when nobody waits,
so a lost wake-up here would hang a request)."""

from __future__ import annotations

from collections.abc import Hashable

import trio
import trio.testing

from proxy.http.conn import Limits, Upstream
from proxy.http.pool import UpstreamPool


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
