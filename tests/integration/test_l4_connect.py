"""connect_tcp's own literal-address connect: the same stream and the same
refusal texts as trio's socket connect, which it stands in for."""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.netaddr import HostPort
from proxy.runtime.l4 import connect_tcp


def _closed_port(family: int, host: str) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = [(socket.AF_INET, "127.0.0.1")] + (
    [(socket.AF_INET6, "::1")] if _has_ipv6_loopback() else []
)


@pytest.mark.parametrize(("family", "host"), FAMILIES)
async def test_a_literal_target_connects(family: int, host: str) -> None:
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    with listener:
        await listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        stream = await connect_tcp(HostPort(host, port), 5)
        assert isinstance(stream, trio.SocketStream)
        async with stream:
            accepted, _ = await listener.accept()
            with accepted:
                assert stream.socket.getpeername()[:2] == (host, port)
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                await stream.send_all(b"ping")
                assert await accepted.recv(4) == b"ping"


@pytest.mark.parametrize(("family", "host"), FAMILIES)
async def test_a_refused_literal_reads_as_trios_connect_would(family: int, host: str) -> None:
    port = _closed_port(family, host)
    result = await connect_tcp(HostPort(host, port), 5)
    assert isinstance(result, tuple)
    # What the audit record said before: trio's own socket connect.
    with trio.socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(OSError) as refused:
        await sock.connect((host, port))
    assert result == ("target_unreachable", str(refused.value.strerror or refused.value))


async def test_a_literal_connect_honours_a_cancelled_scope() -> None:
    port = _closed_port(socket.AF_INET, "127.0.0.1")
    with trio.CancelScope() as scope:
        scope.cancel()
        await connect_tcp(HostPort("127.0.0.1", port), 5)
        pytest.fail("connect_tcp did not raise Cancelled")  # pragma: no cover
    assert scope.cancelled_caught


class _Steps(trio.abc.Instrument):
    """How many times the scheduler ran each task (a step ends at a yield)."""

    def __init__(self) -> None:
        self.steps: dict[trio.lowlevel.Task, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] = self.steps.get(task, 0) + 1


async def test_a_loopback_connect_that_is_done_at_once_does_not_wait() -> None:
    # A loopback connect has completed when connect() returns EINPROGRESS:
    # connect_tcp sees that and returns in the task's first step, with no
    # wait for writability (an epoll registration and a scheduler round).
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        results: list[object] = []

        async def dial() -> None:
            results.append(await connect_tcp(HostPort("127.0.0.1", port), 5))
            task = trio.lowlevel.current_task()
            results.append(steps.steps[task])

        steps = _Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dial)
        finally:
            trio.lowlevel.remove_instrument(steps)
        stream, ran = results
        assert isinstance(stream, trio.SocketStream)
        assert ran == 1
        await stream.aclose()


async def test_a_connect_that_cannot_finish_times_out() -> None:
    # A listener with no backlog room leaves the SYN unanswered: the connect
    # stays in progress, and the timeout (not a completed poll) ends it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = []
        try:
            # Fill the accept queue (never accepted) until a connect hangs.
            for _ in range(8):
                result = await connect_tcp(HostPort("127.0.0.1", port), 0.2)
                if isinstance(result, tuple):
                    break
                queued.append(result)
            else:  # pragma: no cover
                pytest.skip("the kernel kept accepting into a zero backlog")
        finally:
            for stream in queued:
                await stream.aclose()
        assert result == ("target_connect_timeout", "no connection within 0.2s")
