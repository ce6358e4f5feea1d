"""Moving the bytes of established connection pairs: one level-triggered
epoll reactor per process, run as a single trio task.

Theory of operation: trio keeps everything that decides (accept, connect,
handshakes, policy, deadlines, cancellation, audit); once a pair of
sockets only has to move bytes, its task calls :meth:`Reactor.relay` and
sleeps on an event until the pair ends. The reactor owns one epoll set in
which every socket of every live pair stays registered for the pair's
life (``epoll_ctl`` runs only when a socket's interest changes, never per
wait), and trio waits on the epoll fd itself (``wait_readable``). Each
pass services every ready socket once, so no pair starves another; a
wake-up runs another pass (a few at most) only while a pass finds many
sockets ready, so trio's own tasks still get every few passes.

A direction (``_Flow``: src to dst) reads into the one shared scratch
buffer (``recv`` into it for plain sockets, ``SSL_read`` through cffi for
TLS sockets, so no bytes object is made per read) and writes from it at
once. Only when the destination would block are the unsent bytes copied
out (``pending``); the source then leaves the epoll interest set
(backpressure: at most one scratch buffer, 1 MiB, per blocked direction is held)
and the destination is watched for writability until it drains. A TLS
read that OpenSSL already decrypted but the socket no longer shows
(``SSL_pending``) is retried from a ready list without waiting; a pair
that joins with such bytes also writes an eventfd in the epoll set, since
the reactor may be asleep on the epoll fd for other pairs.

Ends of input keep today's relay semantics (proxy/runtime/relay.py): EOF
on one side (TLS close_notify, or a TCP FIN without it: *truncation*, read
as EOF like stunnel and ghostunnel do, and reported) is passed on as a
half-close, ``SSL_shutdown`` to a TLS destination and ``shutdown(SHUT_WR)``
to a plain one, while the other direction keeps flowing; the pair ends
``closed`` when both directions have. A reset or TLS error on either side
ends the pair at once, named after the side (``client_reset``,
``target_reset``). The connection's task ends the pair with
``write_timeout`` when a blocked direction makes no progress for that
long, or ``cancelled`` when trio cancels it (shutdown, lifetime,
certificate expiry: the caller's scope says which). The reactor never
closes a socket: the task that owns it does, after ``relay`` returns.

A *transfer* (:meth:`Reactor.transfer`) is one bounded direction: an HTTP
body of known length moved from one socket to the other, reading nothing
past it and passing no EOF on, after which the HTTP session's task takes
both sockets back (proxy/runtime/direct.py).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
import trio

from proxy.runtime.reactor_pairs import RelayResult as RelayResult  # callers name it from here
from proxy.runtime.reactor_pairs import _Flow, _Pair, _since, _write_deadline
from proxy.tls.raw_io import (
    EOF,
    Broken,
    End,
    PairIo,
    TlsEndpoint,
    pin,
    send_close_notify,
    ssl_pending,
)

log = structlog.get_logger("agent_proxy")

# Sixty-four full TLS records per read and per write: fewer passes of
# Python and fewer wake-ups of the reading side per MiB moved.
# The bench's bulk row with only this size varied (3 runs each, medians):
# 256 KiB 360 MB/s, 512 KiB 433, 1 MiB 470 (HAProxy in HTTP mode: 480).
# A blocked direction holds at most this much, beside the several MiB the
# kernel already buffers for a TCP connection whose reader stalled.
SCRATCH_BYTES = 1 << 20
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
# At most this many passes per trio round, and another only after a pass
# that found this many sockets ready: each trio round costs a re-arm of the
# epoll fd and a scheduler pass that a stream of events does not need. The
# bench's TCP keep-alive row (32 connections): proxy CPU per request
# 32.4 -> 30.3 us (medians of 3). A quiet reactor (one new connection at a
# time) yields after every pass as before, so handshakes wait for no extra pass.
_PASSES_PER_YIELD = 4
_BUSY_PASS = 8


class Reactor(PairIo):
    """Use one per process through :func:`open_reactor`."""

    def __init__(self, scratch_bytes: int = SCRATCH_BYTES, *, use_cffi: bool = True) -> None:
        super().__init__(scratch_bytes, use_cffi)
        self._epoll = select.epoll()
        self._ends: dict[int, tuple[_Pair, End]] = {}
        self._ready: set[int] = set()
        self._kick: trio.Event | None = None
        # Wakes a reactor asleep in epoll for bytes no socket will show:
        # those OpenSSL already decrypted when a pair is added.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self.transfers = 0  # bodies moved by transfer(), for the stats
        self.transferred = 0  # and their bytes

    # -- what the rest of the process sees --------------------------------

    def stats(self) -> dict[str, int]:
        """Live pairs, registered sockets and bytes held for blocked sends."""
        held = {id(p): p for p, _ in self._ends.values()}.values()
        buffered = sum(len(f.pending) for p in held for f in (p.up, p.down) if f.pending)
        return {
            "pairs": len(held),
            "sockets": len(self._ends),
            "buffered_bytes": buffered,
            "transfers": self.transfers,
            "transferred_bytes": self.transferred,
        }

    async def relay(
        self,
        a: trio.SocketStream | TlsEndpoint,
        b: trio.SocketStream | TlsEndpoint,
        *,
        names: tuple[str, str] = ("client", "target"),
        write_timeout: float | None = None,
        result: RelayResult | None = None,
    ) -> RelayResult:
        """Move bytes between ``a`` and ``b`` until the pair ends. ``result``
        (filled in place) still tells what moved when the caller is cancelled."""
        pair = _Pair(End(a, names[0]), End(b, names[1]), result or RelayResult())

        def expire(now: float) -> None:
            if now >= _write_deadline(pair, write_timeout):
                blocked = [f for f in (pair.up, pair.down) if f.blocked_since is not None]
                pair.result.stalled = min(blocked, key=_since).dst.name
                self._finish(pair, "write_timeout", f"no send progress in {write_timeout}s")

        await self._run_pair(pair, lambda: _write_deadline(pair, write_timeout), expire)
        return pair.result

    async def transfer(
        self,
        src: trio.SocketStream | TlsEndpoint,
        dst: trio.SocketStream | TlsEndpoint,
        count: int,
        *,
        names: tuple[str, str] = ("upstream", "client"),
        write_timeout: float | None = None,
        idle_timeout: float | None = None,
        result: RelayResult | None = None,
    ) -> RelayResult:
        """Move exactly ``count`` bytes from ``src`` to ``dst`` (an HTTP
        body of known length), one way, reading nothing past them and
        ending neither side. ``reason``: ``closed`` when all moved, ``eof``
        when ``src`` ended first (``truncated`` says whether without
        close_notify), ``<name>_reset``, ``write_timeout`` (``dst`` took
        nothing for that long), ``idle_timeout`` (``src`` sent nothing for
        that long). ``bytes_up`` says how many moved, all of them sent:
        whatever ended it, none is left held in the reactor."""
        self.transfers += 1
        pair = _Pair(End(src, names[0]), End(dst, names[1]), result or RelayResult())
        flow = pair.up
        flow.left, flow.read_at = count, trio.current_time()
        pair.down.eof = pair.down.done = True  # one way only: dst is never read

        def idle_at() -> float:
            # A blocked send is the write timeout's to judge, not the idle one's.
            if idle_timeout is None or flow.pending is not None:
                return math.inf
            return flow.read_at + idle_timeout

        def expire(now: float) -> None:
            if now >= _write_deadline(pair, write_timeout):
                pair.result.stalled = flow.dst.name
                self._finish(pair, "write_timeout", f"no send progress in {write_timeout}s")
            elif now >= idle_at():
                self._finish(pair, "idle_timeout", f"nothing read in {idle_timeout}s")

        await self._run_pair(
            pair, lambda: min(_write_deadline(pair, write_timeout), idle_at()), expire
        )
        if pair.result.reason != "closed" and flow.pending is not None:
            # Read but never sent: the caller's stream would skip them.
            pair.result.bytes_up -= len(flow.pending)
        self.transferred += pair.result.bytes_up
        return pair.result

    async def _run_pair(
        self, pair: _Pair, deadline: Callable[[], float], expire: Callable[[float], None]
    ) -> None:
        """The calling task's side of a pair: sleep until the reactor ends
        it, or until ``deadline()`` passes, when ``expire(now)`` judges
        (and may end it); a cancellation ends it ``cancelled``."""
        self._add(pair)
        try:
            while not pair.done.is_set():
                at = deadline()
                if at == math.inf:  # nothing to time out: no scope to arm
                    await pair.wakeup.wait()
                else:
                    with trio.move_on_at(at):
                        await pair.wakeup.wait()
                if not pair.done.is_set():
                    pair.wakeup = trio.Event()
                    expire(trio.current_time())
        except BaseException:
            if not pair.done.is_set():
                self._finish(pair, "cancelled", None)
            raise
        finally:
            pair.unlink()  # ended either way: _finish took it out of the epoll set

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        epoll_fd = self._epoll.fileno()
        while True:
            if self._ready:
                await trio.lowlevel.checkpoint()
            elif not self._ends:
                self._kick = trio.Event()
                await self._kick.wait()  # nothing registered: sleep until a pair arrives
                continue
            else:
                await trio.lowlevel.wait_readable(epoll_fd)
            for _ in range(_PASSES_PER_YIELD):  # see _PASSES_PER_YIELD for why
                ready, self._ready = self._ready, set()
                events = self._epoll.poll(0, 4096)
                for fd, mask in events:
                    if fd in ready:  # one service per socket per pass, reading included
                        ready.discard(fd)
                        mask |= _IN
                    self._service(fd, mask)
                for fd in ready:
                    self._service(fd, _IN)
                if len(events) < _BUSY_PASS:
                    break  # quiet: trio's tasks (accepts, handshakes) come first

    def close(self) -> None:
        for pair, _ in list(self._ends.values()):
            self._finish(pair, "cancelled", "reactor closed")
        self._epoll.close()
        os.close(self._wake_fd)

    # -- pairs --------------------------------------------------------------

    def _add(self, pair: _Pair) -> None:
        held = False
        for end in (pair.a, pair.b):
            self._ends[end.fd] = (pair, end)
            self._update(end)  # a relay reads both sides; a transfer only its source
            # OpenSSL may already hold decrypted bytes (the rest of a record
            # the connection's task read in part); a plain socket's bytes
            # are the kernel's, and level-triggered epoll reports them.
            if end.ssl is not None and not end.src_of.eof and ssl_pending(end.ssl) > 0:
                self._ready.add(end.fd)
                held = True
        if self._kick is not None:
            self._kick.set()
        if held:
            # The reactor may be asleep in epoll for other pairs, and no
            # socket will become readable for these bytes.
            os.eventfd_write(self._wake_fd, 1)

    def _finish(self, pair: _Pair, reason: str, detail: str | None) -> None:
        if pair.done.is_set():
            return
        pair.result.reason = reason
        pair.result.detail = detail
        for end in (pair.a, pair.b):
            if self._ends.pop(end.fd, None) is not None and end.mask:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(end.fd)
            self._ready.discard(end.fd)
        pair.done.set()
        pair.wakeup.set()

    def _service(self, fd: int, events: int) -> None:
        entry = self._ends.get(fd)
        if entry is None:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
            return
        pair, end = entry
        try:
            if events & (_IN | select.EPOLLERR | select.EPOLLHUP):
                if end.write_wants_read:
                    end.write_wants_read = False
                    self._pump(end.out)
                self._pump(end.src_of)
            if events & _OUT and not pair.done.is_set():
                if end.read_wants_write:
                    end.read_wants_write = False
                    self._pump(end.src_of)
                self._pump(end.out)
        except Broken as exc:
            self._finish(pair, f"{exc.side}_reset", str(exc))
            return
        except Exception as exc:  # a bug of ours ends this pair, never the reactor
            log.exception("reactor failed on a connection pair")
            self._finish(pair, "internal_error", type(exc).__name__)
            return
        if pair.up.done and pair.down.done:
            # A transfer whose source ended before all its bytes came: eof.
            self._finish(pair, "closed" if not pair.up.left else "eof", None)
        elif not pair.done.is_set():
            self._update(pair.a)
            self._update(pair.b)

    def _update(self, end: End) -> None:
        """epoll interest from state: only on a change does epoll_ctl run."""
        flow_in, flow_out = end.src_of, end.out
        mask = 0
        if (not flow_in.eof and flow_in.pending is None) or end.write_wants_read:
            mask |= _IN
        if flow_out.pending is not None or flow_out.shut_pending or end.read_wants_write:
            mask |= _OUT
        if mask != end.mask:
            # A socket with no interest leaves the set: epoll would keep
            # reporting a hang-up on it that nobody can act on yet.
            if not mask:
                self._epoll.unregister(end.fd)
            elif not end.mask:
                self._epoll.register(end.fd, mask)
            else:
                self._epoll.modify(end.fd, mask)
            end.mask = mask

    # -- moving bytes -------------------------------------------------------

    def _pump(self, flow: _Flow) -> None:
        if flow.done or (flow.pending is not None and not self._flush(flow)):
            return
        left = flow.left
        if left is not None:  # a transfer: no EOF is passed on, none read past
            if left == 0:
                flow.done = True
                return
            if flow.eof:
                return
        elif flow.eof:
            self._pass_eof(flow)
            return
        n = self._read(flow.src, left)
        if n == EOF:
            flow.eof = True
            if flow.src.truncated:
                flow.src.pair.result.truncated.append(flow.src.name)
            if left is None:
                self._pass_eof(flow)
            else:
                flow.done = True
            return
        if n == 0:
            return
        result = flow.src.pair.result
        if flow.upward:
            result.bytes_up += n
        else:
            result.bytes_down += n
        if left is not None:
            flow.left = left - n
            flow.read_at = trio.current_time()
        sent = self._write(flow.dst, self._view[:n], self._cbuf, n)
        if sent < n:
            flow.pending = memoryview(bytes(self._view[sent:n]))
            flow.pending_ptr = None
            flow.blocked_since = trio.current_time()
            flow.src.pair.wakeup.set()  # the owning task arms its write timeout
        elif flow.left == 0:
            flow.done = True  # all moved and sent
            return
        if flow.src.eof_seen or (flow.src.ssl is not None and ssl_pending(flow.src.ssl) > 0):
            self._ready.add(flow.src.fd)

    def _flush(self, flow: _Flow) -> bool:
        data = flow.pending
        assert data is not None
        if flow.dst.ssl is not None and flow.pending_ptr is None:
            flow.pending_ptr = pin(data)
        sent = self._write(flow.dst, data, flow.pending_ptr, len(data))
        if sent == len(data):
            flow.pending = flow.pending_ptr = None
            flow.blocked_since = None
            return True
        if sent:
            flow.pending = data[sent:]
            flow.pending_ptr = None
            flow.blocked_since = trio.current_time()  # progress restarts the clock
        return False

    def _pass_eof(self, flow: _Flow) -> None:
        dst = flow.dst
        flow.shut_pending = False
        if dst.ssl is None:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise Broken(dst.name, f"shutdown: {exc.strerror}") from exc
        # (A truncated TLS side is dead to OpenSSL: it can send nothing more.)
        elif not dst.truncated and not send_close_notify(dst.ssl, dst.name):
            flow.shut_pending = True
            return
        flow.done = True


@contextlib.asynccontextmanager
async def open_reactor(**kwargs: Any) -> AsyncIterator[Reactor]:
    """Run a reactor for the body of the block (one per process)."""
    reactor = Reactor(**kwargs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            yield reactor
            nursery.cancel_scope.cancel()
    finally:
        reactor.close()
