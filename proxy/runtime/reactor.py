"""Moving the bytes of established connection pairs: one level-triggered
epoll reactor per process, run as a single trio task.

Theory of operation: trio keeps everything that decides (accept, connect,
handshakes, policy, deadlines, cancellation, audit); once a pair of
sockets only has to move bytes, its task calls :meth:`Reactor.relay` and
sleeps on an event until the pair ends. The reactor owns one epoll set in
which every socket of every live pair stays registered for the pair's
life (``epoll_ctl`` runs only when a socket's interest changes, never per
wait), and trio waits on the epoll fd itself (``wait_readable``). Each
wake-up services every ready socket once, so no pair starves another.

A direction (``_Flow``: src to dst) reads into the one shared scratch
buffer (``recv`` into it for plain sockets, ``SSL_read`` through cffi for
TLS sockets, so no bytes object is made per read) and writes from it at
once. Only when the destination would block are the unsent bytes copied
out (``pending``); the source then leaves the epoll interest set
(backpressure: at most one scratch buffer per blocked direction is held)
and the destination is watched for writability until it drains. A TLS
read that OpenSSL already decrypted but the socket no longer shows
(``SSL_pending``) is retried from a ready list without waiting.

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
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

log = structlog.get_logger("agent_proxy")

SCRATCH_BYTES = 65536
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_EOF = -1
_WANT_READ, _WANT_WRITE = lib.SSL_ERROR_WANT_READ, lib.SSL_ERROR_WANT_WRITE
_ZERO_RETURN = lib.SSL_ERROR_ZERO_RETURN


class TlsEndpoint(Protocol):
    """A TLS connection on a socket, handshake done (proxy.tls.TLSStream)."""

    @property
    def fileno(self) -> int: ...

    @property
    def ssl_connection(self) -> SSL.Connection: ...


@dataclass
class RelayResult:
    """Why a pair ended and what it moved. ``bytes_up`` were read from the
    first side (the accepted one) and sent to the second, ``bytes_down``
    the other way. ``truncated`` names the TLS sides that ended without
    close_notify (read as EOF)."""

    reason: str = "closed"
    bytes_up: int = 0
    bytes_down: int = 0
    truncated: list[str] = field(default_factory=list)
    detail: str | None = None


class _Broken(Exception):
    def __init__(self, side: str, detail: str) -> None:
        super().__init__(detail)
        self.side = side


class _End:
    """One socket of a pair."""

    __slots__ = (
        "conn",
        "eof_seen",
        "fd",
        "mask",
        "name",
        "out",
        "pair",
        "read_wants_write",
        "shutdown",
        "src_of",
        "ssl",
        "write_wants_read",
    )  # fmt: skip

    def __init__(self, endpoint: trio.SocketStream | TlsEndpoint, name: str) -> None:
        self.name = name
        self.conn: SSL.Connection | None = None
        self.ssl: Any = None  # the SSL* for cffi calls
        self.shutdown: Any = None
        if isinstance(endpoint, trio.SocketStream):
            self.fd = endpoint.socket.fileno()
            self.shutdown = endpoint.socket.shutdown
        else:
            self.fd = endpoint.fileno
            self.conn = endpoint.ssl_connection
            self.ssl = self.conn._ssl  # pyOpenSSL's SSL*: cffi calls skip its per-call allocations
        self.mask = 0
        self.eof_seen = False  # read EOF after bytes still to deliver
        self.read_wants_write = False
        self.write_wants_read = False
        # Set by _Pair: the flow this end feeds, the flow that feeds it, the pair.
        self.src_of: _Flow = None  # type: ignore[assignment]
        self.out: _Flow = None  # type: ignore[assignment]
        self.pair: _Pair = None  # type: ignore[assignment]


class _Flow:
    """One direction of a pair: bytes read from ``src`` are sent to ``dst``."""

    __slots__ = ("blocked_since", "done", "dst", "eof", "pending", "pending_ptr", "shut_pending",
                 "src", "upward")  # fmt: skip

    def __init__(self, src: _End, dst: _End, upward: bool) -> None:
        self.src, self.dst, self.upward = src, dst, upward
        self.pending: memoryview | None = None  # unsent bytes (a copy)
        self.pending_ptr: Any = None
        self.blocked_since: float | None = None
        self.eof = False  # src ended
        self.shut_pending = False  # the EOF still has to reach dst
        self.done = False  # EOF passed on


class _Pair:
    __slots__ = ("a", "b", "done", "down", "result", "up", "wakeup")

    def __init__(self, a: _End, b: _End, result: RelayResult) -> None:
        self.a, self.b, self.result = a, b, result
        self.up, self.down = _Flow(a, b, True), _Flow(b, a, False)
        a.src_of, a.out, b.src_of, b.out = self.up, self.down, self.down, self.up
        a.pair = b.pair = self
        self.done = trio.Event()
        self.wakeup = trio.Event()  # set when the owning task should look again


class Reactor:
    """Use one per process through :func:`open_reactor`."""

    def __init__(self, scratch_bytes: int = SCRATCH_BYTES, *, use_cffi: bool = True) -> None:
        self._epoll = select.epoll()
        self._scratch = bytearray(scratch_bytes)
        self._view = memoryview(self._scratch)
        self._cbuf = ffi.from_buffer(self._scratch)
        self._use_cffi = use_cffi
        self._ends: dict[int, tuple[_Pair, _End]] = {}
        self._ready: set[int] = set()
        self._kick: trio.Event | None = None

    # -- what the rest of the process sees --------------------------------

    def stats(self) -> dict[str, int]:
        """Live pairs, registered sockets and bytes held for blocked sends."""
        held = {id(p): p for p, _ in self._ends.values()}.values()
        buffered = sum(len(f.pending) for p in held for f in (p.up, p.down) if f.pending)
        return {"pairs": len(held), "sockets": len(self._ends), "buffered_bytes": buffered}

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
        pair = _Pair(_End(a, names[0]), _End(b, names[1]), result or RelayResult())
        self._add(pair)
        try:
            while not pair.done.is_set():
                with trio.move_on_at(_write_deadline(pair, write_timeout)):
                    await pair.wakeup.wait()
                if not pair.done.is_set():
                    pair.wakeup = trio.Event()
                    if trio.current_time() >= _write_deadline(pair, write_timeout):
                        self._finish(pair, "write_timeout", f"no send progress in {write_timeout}s")
        except BaseException:
            if not pair.done.is_set():
                self._finish(pair, "cancelled", None)
            raise
        return pair.result

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
            ready, self._ready = self._ready, set()
            for fd, events in self._epoll.poll(0, 4096):
                if fd in ready:  # one service per socket per round, reading included
                    ready.discard(fd)
                    events |= _IN
                self._service(fd, events)
            for fd in ready:
                self._service(fd, _IN)

    def close(self) -> None:
        for pair, _ in list(self._ends.values()):
            self._finish(pair, "cancelled", "reactor closed")
        self._epoll.close()

    # -- pairs --------------------------------------------------------------

    def _add(self, pair: _Pair) -> None:
        for end in (pair.a, pair.b):
            self._ends[end.fd] = (pair, end)
            end.mask = _IN
            self._epoll.register(end.fd, _IN)
            # OpenSSL may already hold application data read with the handshake.
            self._ready.add(end.fd)
        if self._kick is not None:
            self._kick.set()

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
        except _Broken as exc:
            self._finish(pair, f"{exc.side}_reset", str(exc))
            return
        except Exception as exc:  # a bug of ours ends this pair, never the reactor
            log.exception("reactor failed on a connection pair")
            self._finish(pair, "internal_error", type(exc).__name__)
            return
        if pair.up.done and pair.down.done:
            self._finish(pair, "closed", None)
        elif not pair.done.is_set():
            self._update(pair.a)
            self._update(pair.b)

    def _update(self, end: _End) -> None:
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
        if flow.eof:
            self._pass_eof(flow)
            return
        n = self._read(flow.src)
        if n == _EOF:
            flow.eof = True
            self._pass_eof(flow)
            return
        if n == 0:
            return
        result = flow.src.pair.result
        if flow.upward:
            result.bytes_up += n
        else:
            result.bytes_down += n
        sent = self._write(flow.dst, self._view[:n], self._cbuf, n)
        if sent < n:
            flow.pending = memoryview(bytes(self._view[sent:n]))
            flow.pending_ptr = None
            flow.blocked_since = trio.current_time()
            flow.src.pair.wakeup.set()  # the owning task arms its write timeout
        if flow.src.eof_seen or (flow.src.ssl is not None and lib.SSL_pending(flow.src.ssl) > 0):
            self._ready.add(flow.src.fd)

    def _flush(self, flow: _Flow) -> bool:
        data = flow.pending
        assert data is not None
        if flow.dst.ssl is not None and flow.pending_ptr is None:
            flow.pending_ptr = ffi.from_buffer(data)
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
                    raise _Broken(dst.name, f"shutdown: {exc.strerror}") from exc
        elif dst.name not in dst.pair.result.truncated:
            # (A truncated TLS side is dead to OpenSSL: it can send nothing more.)
            lib.ERR_clear_error()
            ret = lib.SSL_shutdown(dst.ssl)
            if ret < 0:
                err = lib.SSL_get_error(dst.ssl, ret)
                if err in (_WANT_WRITE, _WANT_READ):
                    flow.shut_pending = True
                    return
                raise _Broken(dst.name, f"close_notify failed ({_ssl_error_text(err)})")
        flow.done = True

    def _read(self, end: _End) -> int:
        """Bytes read into the scratch buffer, 0 if none now, or _EOF."""
        if end.eof_seen:
            end.eof_seen = False
            return _EOF
        if end.ssl is None:
            try:
                n = os.readv(end.fd, (self._scratch,))
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as exc:
                raise _Broken(end.name, exc.strerror or "read failed") from exc
            return n or _EOF
        if not self._use_cffi:
            return self._read_pyopenssl(end)
        size, total, ssl = len(self._scratch), 0, end.ssl
        while total < size:
            got = lib.SSL_read(ssl, self._cbuf + total, size - total)
            if got > 0:
                total += got
                continue
            err = lib.SSL_get_error(ssl, got)
            if err == _WANT_READ:
                break
            if err == _WANT_WRITE:
                end.read_wants_write = True
                break
            if err == _ZERO_RETURN or _unexpected_eof(err):
                if err != _ZERO_RETURN:
                    end.pair.result.truncated.append(end.name)
                lib.ERR_clear_error()
                if total:
                    end.eof_seen = True
                    break
                return _EOF
            text = _ssl_error_text(err)
            lib.ERR_clear_error()
            raise _Broken(end.name, f"TLS error while receiving: {text}")
        return total

    def _read_pyopenssl(self, end: _End) -> int:
        # The same through pyOpenSSL's recv_into, kept to measure against.
        assert end.conn is not None
        try:
            return end.conn.recv_into(self._scratch) or _EOF
        except SSL.WantReadError:
            return 0
        except SSL.WantWriteError:
            end.read_wants_write = True
            return 0
        except SSL.ZeroReturnError:
            return _EOF
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] != -1:
                raise _Broken(end.name, f"TLS error while receiving: {exc}") from exc
            end.pair.result.truncated.append(end.name)
            return _EOF
        except SSL.Error as exc:
            if "unexpected eof" in str(exc).lower():
                end.pair.result.truncated.append(end.name)
                return _EOF
            raise _Broken(end.name, f"TLS error while receiving: {exc}") from exc

    def _write(self, end: _End, data: memoryview, ptr: Any, n: int) -> int:
        """Bytes of ``data`` sent now (0 when the socket would block)."""
        if end.ssl is None:
            try:
                return os.write(end.fd, data)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as exc:
                raise _Broken(end.name, exc.strerror or "write failed") from exc
        # Partial writes are on (pyOpenSSL's default): one call writes one
        # record, so keep calling until all is sent or the socket is full.
        total = 0
        if not self._use_cffi:
            assert end.conn is not None
            try:
                while total < n:
                    total += end.conn.send(data[total:])
            except SSL.WantWriteError:
                pass
            except SSL.WantReadError:
                end.write_wants_read = True
            except SSL.Error as exc:
                raise _Broken(end.name, f"TLS error while sending: {exc}") from exc
            return total
        ssl = end.ssl
        while total < n:
            sent = lib.SSL_write(ssl, ptr + total, n - total)
            if sent > 0:
                total += sent
                continue
            err = lib.SSL_get_error(ssl, sent)
            if err == _WANT_WRITE:
                break
            if err == _WANT_READ:
                end.write_wants_read = True
                break
            text = _ssl_error_text(err)
            lib.ERR_clear_error()
            raise _Broken(end.name, f"TLS error while sending: {text}")
        return total


def _unexpected_eof(err: int) -> bool:
    """A TCP EOF without close_notify: OpenSSL 3 reports it as an SSL error
    with reason "unexpected eof while reading", older ones as SYSCALL/0."""
    if err == lib.SSL_ERROR_SYSCALL:
        return lib.ERR_peek_error() == 0 and ffi.errno in (0, errno.EAGAIN)
    if err == lib.SSL_ERROR_SSL:
        reason = lib.ERR_reason_error_string(lib.ERR_peek_error())
        return reason != ffi.NULL and b"unexpected eof" in ffi.string(reason)
    return False


def _write_deadline(pair: _Pair, write_timeout: float | None) -> float:
    if write_timeout is None:
        return math.inf
    blocked = [f.blocked_since for f in (pair.up, pair.down) if f.blocked_since is not None]
    return min(blocked) + write_timeout if blocked else math.inf


def _ssl_error_text(err: int) -> str:
    code = lib.ERR_peek_error()
    if code:
        reason = lib.ERR_reason_error_string(code)
        if reason != ffi.NULL:
            return bytes(ffi.string(reason)).decode("ascii", "replace")
    if err == lib.SSL_ERROR_SYSCALL:
        return os.strerror(ffi.errno) if ffi.errno else "connection reset"
    return f"SSL error {err}"


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
