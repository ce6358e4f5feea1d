"""Flush the audit sink once per pass of trio's run loop.

trio calls an instrument's ``before_io_wait`` once per scheduler pass, after
every runnable task has run and before it waits for I/O: the end of a tick.
Records emitted during the tick that no barrier wrote go out here, in one
``write`` for the whole tick. An instrument that raises is removed by trio,
so the hook never raises (``AuditSink.flush`` does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from proxy.audit.sink import AuditSink


class TickFlush(trio.abc.Instrument):
    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink

    def before_io_wait(self, timeout: float) -> None:
        self.sink.commit()
