"""Keep-alive upstream connections, reused across agent requests.

A pool key names one route's upstream *and* the identities it must present,
so a connection verified for one expectation is never handed to a route
that expects another. The pool is bounded per key (idle and total), idle
connections expire, and a connection that became readable while idle (the
upstream closed it, or sent garbage) is dropped instead of reused.
"""

from __future__ import annotations

import math
import select
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from proxy.http.upstream import Upstream

Connector = Callable[[Hashable], Awaitable[Upstream]]
_INF = math.inf  # an upstream without an expiry: no clock to read


def _socket_of(stream: Any) -> Any:
    while not hasattr(stream, "socket") and hasattr(stream, "transport"):
        stream = stream.transport
    return getattr(stream, "socket", None)


def _looks_dead(up: Upstream) -> bool:
    # One poll object per connection, made at its first reuse: the socket
    # (and so its descriptor) is the same for the connection's whole life,
    # and a closed one is never pooled.
    poller = up.poller
    try:
        if poller is None:
            sock = _socket_of(up.stream)
            if sock is None:
                up.poller = False
                return False
            poller = up.poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        elif poller is False:
            return False
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class UpstreamPool:
    def __init__(
        self,
        connect: Connector,
        *,
        max_idle_per_key: int = 32,
        idle_timeout: float = 30.0,
        max_per_key: int = 512,
    ) -> None:
        self._connect = connect
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout = idle_timeout
        self.max_per_key = max_per_key
        self._idle: dict[Hashable, deque[Upstream]] = {}
        self._open: dict[Hashable, int] = {}
        self._freed = trio.Condition()
        self._waiting = 0  # tasks parked in _freed.wait()
        self.connects = 0
        self.reuses = 0

    async def checkout(self, key: Hashable) -> tuple[Upstream, bool]:
        """A connection for ``key`` and whether it was reused."""
        while True:
            idle = self._idle.get(key)
            now = time.monotonic()
            while idle:
                up = idle.pop()  # most recently used first: likeliest alive
                if (
                    now - up.last_used > self.idle_timeout
                    or (up.expires_at < _INF and trio.current_time() >= up.expires_at)
                    or _looks_dead(up)
                ):
                    await self._close(up)
                    continue
                self.reuses += 1
                # No schedule point here: the send that follows at once has
                # its own (proxy.http.streams).
                return up, True
            if self._open.get(key, 0) < self.max_per_key:
                break
            async with self._freed:
                # Taking the lock may have let others run: look again before
                # parking, as _notify wakes only tasks already parked.
                if self._idle.get(key) or self._open.get(key, 0) < self.max_per_key:
                    continue
                self._waiting += 1
                try:
                    await self._freed.wait()
                finally:
                    self._waiting -= 1
        self._open[key] = self._open.get(key, 0) + 1
        try:
            up = await self._connect(key)
        except BaseException:
            await self._release_slot(key)
            raise
        self.connects += 1
        return up, False

    async def checkin(self, up: Upstream) -> None:
        """Return after an exchange; anything not cleanly reusable is closed."""
        idle = self._idle.get(up.key)
        if idle is None:
            idle = self._idle[up.key] = deque()
        if (
            up.cycle.reusable
            and len(idle) < self.max_idle_per_key
            and (up.expires_at == _INF or trio.current_time() < up.expires_at)
        ):
            up.start_next_cycle()
            up.last_used = time.monotonic()
            idle.append(up)
            if self._waiting:  # see _notify; checked here, no coroutine per exchange
                await self._notify()
            return
        await self._close(up)

    async def discard(self, up: Upstream) -> None:
        await self._close(up)

    async def _close(self, up: Upstream) -> None:
        await up.aclose()
        await self._release_slot(up.key)

    async def _release_slot(self, key: Hashable) -> None:
        self._open[key] = max(0, self._open.get(key, 0) - 1)
        await self._notify()

    async def _notify(self) -> None:
        """Wake one task waiting for a free connection, if any waits: taking
        the condition's lock costs a schedule point per exchange otherwise."""
        if self._waiting:  # statistics() would build two objects per exchange
            async with self._freed:
                self._freed.notify()

    async def sweep_forever(self) -> None:
        """Close idle connections past their time, so they do not pile up."""
        while True:
            await trio.sleep(max(self.idle_timeout / 2, 0.5))
            now = time.monotonic()
            for queue in self._idle.values():
                for up in [u for u in queue if now - u.last_used > self.idle_timeout]:
                    queue.remove(up)
                    await self._close(up)

    async def aclose(self) -> None:
        for queue in self._idle.values():
            while queue:
                await self._close(queue.pop())
