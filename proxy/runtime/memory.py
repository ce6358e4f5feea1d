"""Giving the heap back to the system after a burst of connections.

Theory of operation: each TLS connection makes OpenSSL allocate tens of KiB
through malloc (handshake state, record buffers, key shares: a post-quantum
hybrid's alone are ~7 KiB a side). When a burst ends and those connections
close, glibc keeps the freed pages in its heap, so a sidecar that once held
a thousand connections, or whose upstream pool grew for a moment, keeps that
size for good; under a pod's memory limit that is memory the agent cannot
have. ``malloc_trim(0)`` returns the free pages (HAProxy trims the same way
when it releases its pools). A background task reads how much the heap
holds free (``mallinfo2``, a fraction of a microsecond) every few seconds
and trims when that passes a threshold: a steady load never reaches it,
and a trim costs well under a millisecond. Off glibc (musl, macOS) there is
nothing to call and the task returns at once.

Python's own small objects live in pymalloc arenas, which are returned
when they empty whatever we do; this is about what C code allocated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

log = structlog.get_logger("agent_proxy")

CHECK_EVERY_S = 5.0
TRIM_ABOVE_BYTES = 2 << 20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@dataclass(frozen=True)
class Heap:
    """The two calls this needs from the C library."""

    free_bytes: Callable[[], int]  # free memory the heap holds
    trim: Callable[[], None]  # give what it can back


def glibc_heap() -> Heap | None:
    """glibc's heap, or None where its calls are missing (another libc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    mallinfo2.argtypes = []
    malloc_trim.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]

    def free_bytes() -> int:
        info = mallinfo2()
        return int(info.fordblks + info.fsmblks)

    def trim() -> None:
        malloc_trim(0)

    return Heap(free_bytes, trim)


async def release_forever(
    heap: Heap | None = None,
    *,
    every: float = CHECK_EVERY_S,
    above: int = TRIM_ABOVE_BYTES,
) -> None:
    """Trim the heap whenever it holds more than ``above`` bytes free. A
    failing call is logged once and ends the task: serving goes on."""
    heap = heap if heap is not None else glibc_heap()
    if heap is None:
        return
    while True:
        await trio.sleep(every)
        try:
            free = heap.free_bytes()
            if free > above:
                heap.trim()
                log.debug("heap trimmed", free_before=free, free_after=heap.free_bytes())
        except Exception as exc:  # a C library that misbehaves must not stop us
            log.warning("heap trimming stopped", error=str(exc))
            return
