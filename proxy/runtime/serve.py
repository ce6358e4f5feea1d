"""Running listeners until a signal, then draining with a deadline.

Two nurseries, as trio's own servers do it: one for accept loops and one for
connection handlers. SIGTERM or SIGINT cancels the accept loops (no new
connections; the listening sockets close), then the handler nursery gets a
deadline: connections still open when it passes are cancelled, and each
writes its close record on the way out. SIGHUP calls ``on_hup`` (reload)
and keeps serving. Background tasks (identity sources, the admin endpoint)
run until the drain is over, and so does the process's one epoll reactor
(proxy/runtime/reactor.py), which moves the bytes of established TCP pairs
while their handlers keep the deadlines.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog
import trio

from proxy import notify
from proxy.runtime.reactor import Reactor, open_reactor

log = structlog.get_logger("agent_proxy")


class Listener(Protocol):
    active: int
    reactor: Reactor | None

    async def serve(
        self, handlers: trio.Nursery, task_status: trio.TaskStatus[list[str]] = ...
    ) -> None: ...


async def run_until_signalled(
    listeners: Sequence[Listener],
    *,
    drain_timeout: float,
    background: Sequence[Callable[[], Awaitable[object]]] = (),
    on_hup: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    on_reactor: Callable[[Reactor | None], None] | None = None,
) -> None:
    """``on_reactor`` hears of the process's reactor when it starts, and
    None when it stops (the metrics read it at scrape time)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as services:
            for task in background:
                services.start_soon(task)
            async with open_reactor() as reactor:
                for listener in listeners:
                    listener.reactor = reactor
                if on_reactor is not None:
                    on_reactor(reactor)
                async with trio.open_nursery() as handlers:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            await accepting.start(listener.serve, handlers)
                        if on_ready is not None:
                            on_ready()
                        log.info("ready", listeners=len(listeners))
                        notify.ready()  # --ready-fd: our supervisor learns it from us alone
                        async for signum in signals:
                            if signum == signal.SIGHUP:
                                log.info("SIGHUP: reloading")
                                if on_hup is not None:
                                    on_hup()
                                continue
                            open_now = sum(listener.active for listener in listeners)
                            log.info(
                                "draining",
                                signal=signal.Signals(signum).name,
                                open_connections=open_now,
                                deadline_s=drain_timeout,
                            )
                            accepting.cancel_scope.cancel()
                            break
                    log.info("listeners closed", open_connections=sum(x.active for x in listeners))
                    handlers.cancel_scope.deadline = trio.current_time() + drain_timeout
                if on_reactor is not None:
                    on_reactor(None)
            services.cancel_scope.cancel()
    log.info("stopped")
