"""The heap goes back to the system after a burst (proxy.runtime.memory):
glibc's own calls on this machine, and the background task's rule."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import trio
import trio.testing

from proxy.runtime.memory import CHECK_EVERY_S, TRIM_ABOVE_BYTES, Heap, glibc_heap, release_forever


def _private_dirty_kib() -> int:
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    raise AssertionError("no Private_Dirty in smaps_rollup")


def test_a_trim_gives_freed_heap_pages_back() -> None:
    heap = glibc_heap()
    if heap is None:
        pytest.skip("not glibc")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # 48 MiB in blocks too small for mmap (as OpenSSL allocates), touched,
    # with one block kept above them so the heap cannot just shrink from
    # its top: only a trim returns the pages in the middle.
    blocks = []
    for _ in range(48 * 1024):
        block = libc.malloc(1024)
        libc.memset(block, 1, 1024)
        blocks.append(block)
    pin = libc.malloc(1024)
    for block in blocks:
        libc.free(block)
    try:
        assert heap.free_bytes() > 40 << 20
        before = _private_dirty_kib()
        heap.trim()
        assert before - _private_dirty_kib() > 32 * 1024
    finally:
        libc.free(pin)


async def test_the_task_trims_only_when_the_heap_holds_enough_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    free = [1 << 20]
    trims: list[float] = []

    def free_bytes() -> int:
        return free[0]

    def trim() -> None:
        trims.append(trio.current_time())
        free[0] = 0

    start = trio.current_time()
    with trio.move_on_after(CHECK_EVERY_S * 1.5):
        await release_forever(Heap(free_bytes, trim))
    assert trims == []  # 1 MiB free: below the threshold
    free[0] = TRIM_ABOVE_BYTES + 1
    with trio.move_on_after(CHECK_EVERY_S * 3):
        await release_forever(Heap(free_bytes, trim))
    assert len(trims) == 1  # trimmed once, then nothing was free
    assert trims[0] - start >= CHECK_EVERY_S


async def test_a_failing_c_call_ends_the_task_not_the_process(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def broken() -> int:
        raise OSError("mallinfo2 went away")

    with trio.fail_after(CHECK_EVERY_S * 2):
        await release_forever(Heap(broken, lambda: None))  # returns: no exception
