"""Running listeners until a signal, then draining with a deadline.

Two nurseries, as trio's own servers do it: one for accept loops and one for
connection handlers. SIGTERM or SIGINT cancels the accept loops (no new
connections; the listening sockets close), then the handler nursery gets a
deadline: connections still open when it passes are cancelled, and each
writes its close record on the way out.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Protocol

import structlog
import trio

log = structlog.get_logger("agent_proxy")


class Listener(Protocol):
    active: int

    async def serve(
        self, handlers: trio.Nursery, task_status: trio.TaskStatus[list[str]] = ...
    ) -> None: ...


async def run_until_signalled(listeners: Sequence[Listener], *, drain_timeout: float) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    await accepting.start(listener.serve, handlers)
                log.info("ready", listeners=len(listeners))
                async for signum in signals:
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
    log.info("stopped")
