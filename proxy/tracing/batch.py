"""A bounded batch span processor that counts what it drops.

The SDK's own BatchSpanProcessor drops silently when its queue is full; an
operator needs the number (``agent_proxy_trace_spans_dropped_total``). The
request side only appends to a deque; one daemon thread exports.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import structlog

log = structlog.get_logger("agent_proxy.tracing")


class Batcher:
    def __init__(self, exporter: Any, max_queue: int, batch_size: int, delay: float) -> None:
        self.exporter = exporter
        self.max_queue, self.batch_size, self.delay = max_queue, batch_size, delay
        self.dropped = 0
        self.exported = 0
        self._queue: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    # -- SpanProcessor ------------------------------------------------------

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def _on_ending(self, span: Any) -> None:
        return None

    def on_end(self, span: Any) -> None:
        if not span.context.trace_flags.sampled:
            return
        with self._cond:
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                return
            self._queue.append(span)
            if len(self._queue) >= self.batch_size:
                self._cond.notify()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._cond:
            self._cond.notify()
        return True

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=self.exporter_timeout() + 1.0)
        self.exporter.shutdown()

    def exporter_timeout(self) -> float:
        timeout = getattr(self.exporter, "_timeout", 10.0)
        return float(timeout) if isinstance(timeout, int | float) else 10.0

    # -- the export thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(self.delay)
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self.batch_size))
                ]
                stopping = self._stopping and not self._queue
            if batch:
                self._export(batch)
            if stopping and not batch:
                return

    def _export(self, batch: list[Any]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
        except Exception as exc:  # the export thread survives any exporter failure
            ok = False
            log.debug("span export raised", error=str(exc))
        with self._cond:
            if ok:
                self.exported += len(batch)
            else:
                self.dropped += len(batch)
        if ok != (not self._failing):
            self._failing = not ok
            if ok:
                log.info("span export recovered")
            else:
                log.warning("span export failing; dropping spans", dropped=self.dropped)
