"""Bidirectional byte relay with half-close and a write deadline.

Each direction runs in its own task: read, write, and on EOF pass the EOF on
(``send_eof``) while the other direction keeps flowing. A broken stream on
either side aborts both directions: a reset is not a half-close. A write
that does not complete within ``write_timeout`` (the receiver stopped
reading and the buffers filled) aborts both too, with reason
``write_timeout``: a stalled reader must not hold two connections forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

RELAY_CHUNK = 65536


@dataclass
class RelayStats:
    """Bytes read from the accepted side (``up``) and from the far side
    (``down``) and handed on to the other; why the relay failed, if it did."""

    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    detail: str | None = None
    stalled: str | None = None  # write_timeout: the side that stopped reading
    cause: BaseException | None = None  # what broke, for the caller to classify


async def _pump(
    src: trio.abc.Stream,
    dst: trio.abc.Stream,
    stats: RelayStats,
    upward: bool,
    abort: trio.CancelScope,
    write_timeout: float,
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
            with trio.move_on_after(write_timeout) as scope:
                await dst.send_all(data)
            if scope.cancelled_caught:
                if stats.error is None:
                    stats.error, stats.stalled = "write_timeout", dst_name
                    stats.detail = f"the {dst_name} read nothing for {write_timeout:g}s"
                abort.cancel()
                return
        failed = dst_name
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if stats.error is None:
            stats.error = f"{failed}_reset"
            stats.cause = exc
        abort.cancel()


async def relay(
    accepted: trio.abc.Stream,
    far: trio.abc.Stream,
    stats: RelayStats,
    *,
    write_timeout: float = math.inf,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, accepted, far, stats, True, nursery.cancel_scope, write_timeout)
        nursery.start_soon(_pump, far, accepted, stats, False, nursery.cancel_scope, write_timeout)
