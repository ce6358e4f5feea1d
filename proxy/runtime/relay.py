"""Bidirectional byte relay with half-close.

Each direction runs in its own task: read, write, and on EOF pass the EOF on
(``send_eof``) while the other direction keeps flowing. A broken stream on
either side aborts both directions: a reset is not a half-close.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

RELAY_CHUNK = 65536


@dataclass
class RelayStats:
    """Bytes read from the accepted side (``up``) and from the far side
    (``down``) and handed on to the other."""

    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None


async def _pump(
    src: trio.abc.Stream,
    dst: trio.abc.Stream,
    stats: RelayStats,
    upward: bool,
    abort: trio.CancelScope,
) -> None:
    # Which side failed matters to an operator reading the audit trail.
    src_name, dst_name = ("client", "target") if upward else ("target", "client")
    failed = src_name
    try:
        while True:
            failed = src_name
            data = await src.receive_some(RELAY_CHUNK)
            if not data:
                break
            # Counted as read: a cancel can land after the kernel took the
            # bytes but before send_all returns.
            if upward:
                stats.bytes_up += len(data)
            else:
                stats.bytes_down += len(data)
            failed = dst_name
            await dst.send_all(data)
        failed = dst_name
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        if stats.error is None:
            stats.error = f"{failed}_reset"
        abort.cancel()


async def relay(accepted: trio.abc.Stream, far: trio.abc.Stream, stats: RelayStats) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, accepted, far, stats, True, nursery.cancel_scope)
        nursery.start_soon(_pump, far, accepted, stats, False, nursery.cancel_scope)
