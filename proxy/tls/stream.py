"""A trio stream for TLS on the socket: pyOpenSSL's ``SSL.Connection`` over
the non-blocking socket, OpenSSL doing the reads and writes itself.

Theory of operation: every operation calls OpenSSL (a receive reads record
after record while more is plausibly there) and, when OpenSSL answers
"want read" or "want write", waits for the socket to become readable or
writable and calls it again. Either direction may want either
readiness (SSL_read may have to write: an alert, a KeyUpdate reply;
SSL_write may have to read), so the receiver and the sender can both need
the same one. trio lets one task wait per readiness per socket, so the
second task waits on the first one's event instead and then retries its
own call. An SSL_write that returned "want write" may hold part of a
record: the retry passes the same bytes, and a send cancelled at that
point leaves the stream broken, since nothing else may be written first.

OpenSSL writes its own alerts (a refused handshake, ``no_renegotiation``)
straight to the socket, so nothing waits in a buffer for a later flush.

The stream never calls OpenSSL once its socket is closed: the fd number may
already belong to another connection. ``aclose`` sends close_notify (one
non-blocking attempt: a peer that stopped reading gets a plain close) and
then closes the socket, so the owner of a TLSStream closes only it.

Errors mean what they mean for trio's own streams: ``ClosedResourceError``
when *we* closed this stream and then used it, ``BrokenResourceError`` when
the connection broke or the peer sent something TLS cannot accept. A failed
handshake raises :class:`TLSHandshakeError` (a ``BrokenResourceError``) that
carries the audit reason; OpenSSL has already sent its alert.

TLS 1.3 half-close: ``send_eof`` sends close_notify and keeps reading, which
the protocol allows (RFC 8446, 6.1). A peer's close_notify reads as b"". A
TCP EOF without close_notify also reads as b"" (like stunnel and
ghostunnel: many clients never send close_notify) and sets ``truncated``.

For an event loop that moves established connections itself (the epoll
reactor): after ``do_handshake``, ``fileno`` and ``ssl_connection`` are the
socket and the OpenSSL connection to drive, while no task is inside this
stream's methods. OpenSSL may hold decrypted bytes that the socket no
longer shows as readable: call ``ssl_connection.pending()`` (or just read)
before waiting for readability. When it hands the connection back, it
calls :meth:`TLSStream.released` with what it saw, so ``aclose`` neither
sends a second close_notify nor writes to a connection that broke.
"""

from __future__ import annotations

import contextlib
import operator

import trio
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from proxy.tls.context import TlsSide
from proxy.tls.raw_io import classify_handshake_error as _classify_ssl_error
from proxy.tls.raw_io import discard_unread, recv_records, send_records
from proxy.tls.raw_io import is_unexpected_eof as _is_unexpected_eof

_RECV_CHUNK = 65536
_SEND_CHUNK = 262144


class TLSHandshakeError(trio.BrokenResourceError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over ``transport``'s socket, verified by ``side`` in the handshake."""

    def __init__(self, transport: trio.SocketStream, side: TlsSide) -> None:
        self.transport = transport
        self._sock = transport.socket
        self._fd = self._sock.fileno()
        self._conn, self.peer = side.new_connection(self._sock)
        self._handshaking = False
        self._handshake_ended: trio.Event | None = None
        self._read_wait: trio.Event | None = None
        self._write_wait: trio.Event | None = None
        self._receiving = False
        self._sending = False
        self._write_pending = False  # OpenSSL holds part of a record
        self._read_blocked = False  # receive_now's last try needed the socket
        self._handshake_done = False
        self._closed = False
        self._broken = False
        self._eof_sent = False
        self.truncated = False  # the peer ended TCP without close_notify
        self._later: SSL.Error | None = None  # a read's failure after its bytes

    @property
    def fileno(self) -> int:
        """The socket's file descriptor (for a reactor; see the module doc)."""
        return self._fd

    @property
    def ssl_connection(self) -> SSL.Connection:
        """The OpenSSL connection on ``fileno`` (for a reactor, after the
        handshake; see the module doc)."""
        return self._conn

    @property
    def idle(self) -> bool:
        """Whether a reactor may drive ``ssl_connection`` now and hand it back:
        open, no task in a send or receive, no partial record, no kept error."""
        busy = self._sending or self._receiving or self._write_pending or self._eof_sent
        ended = self._closed or self._broken or self.truncated or self._later is not None
        return self._handshake_done and not (busy or ended) and self._sock.fileno() == self._fd

    def released(self, *, broken: bool, truncated: bool) -> None:
        """A reactor stopped driving ``ssl_connection``: what it saw there.
        (A close_notify it sent shows in OpenSSL's own shutdown state.)"""
        self._broken = self._broken or broken
        self.truncated = self.truncated or truncated

    # -- without waiting (the HTTP hot path: proxy.http.streams) -----------

    def send_now(self, data: bytes) -> int:
        """Send what OpenSSL and the socket take at once, without waiting or
        a checkpoint; how many bytes of ``data`` went. After a short count
        the caller continues with :meth:`send_all` from that offset, which
        repeats the record OpenSSL may hold part of (the retry SSL_write
        wants; pyOpenSSL sets ACCEPT_MOVING_WRITE_BUFFER)."""
        if (
            self._sending
            or self._eof_sent
            or not self._handshake_done
            or self._closed
            or self._broken
            or self._sock.fileno() != self._fd
        ):
            return 0
        sent, self._write_pending = send_records(self._conn, data)
        return sent

    def receive_now(self, max_bytes: int) -> bytes | None:
        """What OpenSSL has or the socket gives at once (``b""`` at the end),
        or None when that would mean waiting: then the caller awaits
        :meth:`receive_some`. No checkpoint; errors as ``receive_some``."""
        if (
            self._receiving
            or not self._handshake_done
            or self._closed
            or self._broken
            or self.truncated
            or self._sock.fileno() != self._fd
        ):
            return None
        try:
            return self._recv(max_bytes)
        except SSL.WantReadError:
            self._read_blocked = True
            return None
        except SSL.WantWriteError:
            return None
        except SSL.ZeroReturnError:
            return b""
        except SSL.Error as exc:
            if not _is_unexpected_eof(exc):
                raise self._broke("receiving", exc) from exc
            self.truncated = True
            return b""

    # -- plumbing ---------------------------------------------------------

    def _recv(self, size: int) -> bytes:
        """``SSL.Connection.recv``, several records at once (raw_io.recv_records)."""
        if self._later is not None:
            exc, self._later = self._later, None
            raise exc
        data, self._later = recv_records(self._conn, size)
        return data

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._broken:
            raise trio.BrokenResourceError("TLS stream is broken")

    def _check_socket(self) -> None:
        """Before every OpenSSL call: its fd must still be our socket."""
        self._check_usable()
        if self._sock.fileno() != self._fd:
            self._broken = True
            raise trio.BrokenResourceError("the socket under the TLS stream was closed")

    async def _wait(self, readable: bool) -> None:
        """Wait until the socket may be ready, or until the other task that
        is already waiting for the same readiness wakes up."""
        current = self._read_wait if readable else self._write_wait
        if current is not None:
            await current.wait()
            return
        event = trio.Event()
        if readable:
            self._read_wait = event
        else:
            self._write_wait = event
        try:
            if readable:
                await trio.lowlevel.wait_readable(self._fd)
            else:
                await trio.lowlevel.wait_writable(self._fd)
        except trio.ClosedResourceError:
            if self._closed:
                raise
            self._broken = True
            raise trio.BrokenResourceError("the socket under the TLS stream was closed") from None
        finally:
            if readable:
                self._read_wait = None
            else:
                self._write_wait = None
            event.set()

    def _broke(self, what: str, exc: SSL.Error) -> trio.BrokenResourceError:
        self._broken = True
        return trio.BrokenResourceError(f"TLS error while {what}: {exc}")

    # -- handshake --------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake; the caller puts the deadline around it."""
        self._check_usable()
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        # The receiver and the sender may both start it: one runs it, the
        # other waits for it to end (an Event made only then: contention is
        # rare, and a lock per connection cost a scheduling round to take).
        while self._handshaking:
            if self._handshake_ended is None:
                self._handshake_ended = trio.Event()
            await self._handshake_ended.wait()
            waited = True
        if not self._handshake_done:
            self._handshaking = True
            try:
                waited = await self._handshake_loop() or waited
            finally:
                self._handshaking = False
                ended, self._handshake_ended = self._handshake_ended, None
                if ended is not None:
                    ended.set()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _handshake_loop(self) -> bool:
        """SSL_do_handshake until done; whether it waited for the socket.
        Called through cffi as raw_io does: pyOpenSSL's wrapper raises (and
        we catch) an exception for every "want read"."""
        ssl = self._conn._ssl
        waited = False
        while True:
            self._check_socket()
            ret = _lib.SSL_do_handshake(ssl)
            if ret == 1:
                break
            err = _lib.SSL_get_error(ssl, ret)
            waited = True
            if err == _lib.SSL_ERROR_WANT_READ:
                await self._wait(readable=True)
                continue
            if err == _lib.SSL_ERROR_WANT_WRITE:
                await self._wait(readable=False)
                continue
            self._broken = True
            try:  # pyOpenSSL's own SSL.Error for it: _classify_ssl_error reads its text
                self._conn._raise_ssl_error(ssl, ret)
            except SSL.Error as exc:
                if self.peer.reason is not None:
                    raise TLSHandshakeError(self.peer.reason, self.peer.message or "") from exc
                raise TLSHandshakeError(*_classify_ssl_error(exc)) from exc
            raise TLSHandshakeError("tls_error", f"TLS handshake failed: SSL error {err}")
        self._handshake_done = True
        return waited

    # -- Stream API -------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            size = _RECV_CHUNK
        else:
            size = operator.index(max_bytes)
            if size < 1:
                raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            self._check_usable()
            await trio.lowlevel.checkpoint_if_cancelled()
            if not self._handshake_done:
                await self.do_handshake()
            waited = False
            while True:
                self._check_socket()
                if self.truncated:  # OpenSSL is in its failed state now; EOF stays EOF
                    data = b""
                    break
                if self._read_blocked:
                    # receive_now just found OpenSSL needing the socket: asking
                    # again now would only cost a read() that says EAGAIN.
                    self._read_blocked = False
                    if not self._conn.pending():
                        await self._wait(readable=True)
                        waited = True
                        continue
                try:
                    data = self._recv(size)
                    break
                except SSL.WantReadError:
                    await self._wait(readable=True)
                except SSL.WantWriteError:
                    await self._wait(readable=False)
                except SSL.ZeroReturnError:
                    data = b""
                    break
                except SSL.Error as exc:
                    if not _is_unexpected_eof(exc):
                        raise self._broke("receiving", exc) from exc
                    self.truncated = True
                    data = b""
                    break
                waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            self._check_usable()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof was already called")
            await trio.lowlevel.checkpoint_if_cancelled()
            if not self._handshake_done:
                await self.do_handshake()
            view = memoryview(data)
            if view.itemsize != 1:
                view = view.cast("B")
            waited = False
            while view:
                self._check_socket()
                chunk = view[:_SEND_CHUNK]
                try:
                    sent = self._conn.send(chunk)
                except SSL.WantWriteError:
                    self._write_pending = True
                    await self._wait(readable=False)
                    waited = True
                    continue
                except SSL.WantReadError:
                    self._write_pending = True
                    await self._wait(readable=True)
                    waited = True
                    continue
                except SSL.Error as exc:
                    raise self._broke("sending", exc) from exc
                self._write_pending = False
                view = view[sent:]
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            if self._write_pending:
                # Left (cancelled) with part of a record inside OpenSSL: no
                # other bytes may follow it.
                self._broken = True
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            self._check_usable()
            await self._wait(readable=False)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Send close_notify; we can still receive (TLS 1.3 half-close)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            self._check_usable()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            if not self._handshake_done:
                await self.do_handshake()
            self._eof_sent = True
            waited = False
            while True:
                self._check_socket()
                try:
                    self._conn.shutdown()
                    break
                except SSL.WantWriteError:
                    await self._wait(readable=False)
                except SSL.WantReadError:
                    await self._wait(readable=True)
                except SSL.Error as exc:
                    raise self._broke("closing", exc) from exc
                waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """``aclose`` without its checkpoint, for an owner that is done with
        the connection: nothing in a close waits (close_notify is one
        non-blocking attempt), so it needs no deadline and no shield."""
        if self._closed:
            return
        self._closed = True
        try:
            if (
                self._handshake_done
                and not self._broken
                and not self._eof_sent
                and not self._write_pending
                and self._sock.fileno() == self._fd
                and not self._conn.get_shutdown() & SSL.SENT_SHUTDOWN
            ):
                self._eof_sent = True
                # Best effort: the socket may be full or already broken.
                with contextlib.suppress(SSL.Error):
                    self._conn.shutdown()
            if self._sock.fileno() == self._fd:
                discard_unread(self._fd)
        finally:
            self._sock.close()
