"""Reading and writing one socket of a reactor pair (see proxy/runtime/reactor.py).

Plain sockets use ``readv``/``write`` on the fd; TLS sockets call OpenSSL
through pyOpenSSL's cffi binding (``SSL_read``/``SSL_write`` on the
connection's ``SSL*`` with one preallocated pointer into the scratch
buffer), because pyOpenSSL's ``recv_into`` and ``send`` allocate and copy
per call. The pyOpenSSL path stays for comparison (``use_cffi=False``).
A TCP EOF without close_notify is *truncation*: it reads as EOF and sets
``End.truncated``; any other error raises :class:`Broken` naming the side.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from typing import Any, Protocol

import trio
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

EOF = -1
_WANT_READ, _WANT_WRITE = lib.SSL_ERROR_WANT_READ, lib.SSL_ERROR_WANT_WRITE
_ZERO_RETURN = lib.SSL_ERROR_ZERO_RETURN


class TlsEndpoint(Protocol):
    """A TLS connection on a socket, handshake done (proxy.tls.TLSStream)."""

    @property
    def fileno(self) -> int: ...

    @property
    def ssl_connection(self) -> SSL.Connection: ...


class Broken(Exception):
    def __init__(self, side: str, detail: str) -> None:
        super().__init__(detail)
        self.side = side


class End:
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
        "truncated",
        "write_wants_read",
    )

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
        self.truncated = False  # TLS: TCP EOF without close_notify
        # Set by the reactor's pair: the flow this end feeds, the flow that
        # feeds it, the pair itself.
        self.src_of: Any = None
        self.out: Any = None
        self.pair: Any = None


class PairIo:
    """The byte-moving half of the reactor: one scratch buffer, shared."""

    def __init__(self, scratch_bytes: int, use_cffi: bool) -> None:
        self._scratch = bytearray(scratch_bytes)
        self._view = memoryview(self._scratch)
        self._cbuf = ffi.from_buffer(self._scratch)
        self._use_cffi = use_cffi

    def _read(self, end: End, limit: int | None = None) -> int:
        """Bytes read into the scratch buffer (at most ``limit``), 0 if none
        now, or EOF."""
        if end.eof_seen:
            end.eof_seen = False
            return EOF
        size = len(self._scratch) if limit is None else min(limit, len(self._scratch))
        if end.ssl is None:
            try:
                n = os.readv(
                    end.fd, (self._scratch if size == len(self._scratch) else self._view[:size],)
                )
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as exc:
                raise Broken(end.name, exc.strerror or "read failed") from exc
            return n or EOF
        if not self._use_cffi:
            return self._read_pyopenssl(end, size)
        total, _ret, err = read_records(end.ssl, self._cbuf, size)
        if not err or err == _WANT_READ:
            return total
        if err == _WANT_WRITE:
            end.read_wants_write = True
            return total
        if err == _ZERO_RETURN or _unexpected_eof(err):
            if err != _ZERO_RETURN:
                end.truncated = True
            lib.ERR_clear_error()
            if total:
                end.eof_seen = True
                return total
            return EOF
        text = ssl_error_text(err)
        lib.ERR_clear_error()
        raise Broken(end.name, f"TLS error while receiving: {text}")

    def _read_pyopenssl(self, end: End, size: int) -> int:
        # The same through pyOpenSSL's recv_into, kept to measure against.
        assert end.conn is not None
        try:
            return end.conn.recv_into(self._scratch, size) or EOF
        except SSL.WantReadError:
            return 0
        except SSL.WantWriteError:
            end.read_wants_write = True
            return 0
        except SSL.ZeroReturnError:
            return EOF
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] != -1:
                raise Broken(end.name, f"TLS error while receiving: {exc}") from exc
            end.truncated = True
            return EOF
        except SSL.Error as exc:
            if "unexpected eof" in str(exc).lower():
                end.truncated = True
                return EOF
            raise Broken(end.name, f"TLS error while receiving: {exc}") from exc

    def _write(self, end: End, data: memoryview, ptr: Any, n: int) -> int:
        """Bytes of ``data`` sent now (0 when the socket would block)."""
        if end.ssl is None:
            try:
                return os.write(end.fd, data)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as exc:
                raise Broken(end.name, exc.strerror or "write failed") from exc
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
                raise Broken(end.name, f"TLS error while sending: {exc}") from exc
            return total
        total, err = write_records(end.ssl, ptr, n)
        if not err or err == _WANT_WRITE:
            return total
        if err == _WANT_READ:
            end.write_wants_read = True
            return total
        text = ssl_error_text(err)
        lib.ERR_clear_error()
        raise Broken(end.name, f"TLS error while sending: {text}")


# TLS's largest record payload (RFC 8446 section 5.1): a full one suggests a
# bulk stream with more records already in the socket.
_MAX_PLAINTEXT = 16384


def read_records(ssl: Any, buf: Any, size: int) -> tuple[int, int, int]:
    """SSL_read into ``buf`` (a cffi pointer to ``size`` bytes) record after
    record while more is plausibly there: ``(bytes read, the last
    SSL_read's return, its SSL_get_error)``, the error 0 when it stopped
    because the buffer is full or a record fell short. A record short of
    the maximum is most likely all there is (a request, an answer), so
    another SSL_read would only cost a read() that says EAGAIN;
    decrypted leftovers show in SSL_pending. The error queue is left as
    the failing call left it, for the caller to read."""
    total = 0
    while total < size:
        got = lib.SSL_read(ssl, buf + total, size - total)
        if got <= 0:
            return total, got, lib.SSL_get_error(ssl, got)
        total += got
        if got < _MAX_PLAINTEXT and not lib.SSL_pending(ssl):
            break
    return total, total, 0


# One buffer per thread for every TLSStream's reads: trio runs them one at a
# time and each copies out what it read before returning. Per thread, not
# per process, because cffi releases the GIL around SSL_read: two threads
# sharing one buffer could hand one connection's bytes to another.
_BATCH = 262144
_batches = threading.local()


def _batch() -> tuple[memoryview, Any]:
    try:
        return _batches.view, _batches.ptr
    except AttributeError:
        buf = bytearray(_BATCH)
        _batches.view, _batches.ptr = memoryview(buf), ffi.from_buffer(buf)
        return _batches.view, _batches.ptr


def recv_records(conn: SSL.Connection, size: int) -> tuple[bytes, SSL.Error | None]:
    """pyOpenSSL's ``conn.recv(size)``, raising what it raises, but record
    after record (:func:`read_records`) into the shared buffer, so a bulk
    body costs one pass of the caller per up to 256 KiB, not per 16 KiB
    record, and no cffi buffer is allocated per call. When a record after
    the first fails, the bytes before it come back with the error
    pyOpenSSL raises for it (ZeroReturnError at a close_notify): the
    caller raises that on its next read."""
    if size < 1:
        raise ValueError("max_bytes must be at least 1")
    view, ptr = _batch()
    total, ret, err = read_records(conn._ssl, ptr, min(size, _BATCH))
    if not total:
        if err == _WANT_READ:  # the common wait, without pyOpenSSL's error dispatch
            raise SSL.WantReadError()
        conn._raise_ssl_error(conn._ssl, ret)
        return b"", None
    later = None
    if err and err != _WANT_READ and err != _WANT_WRITE:
        try:
            conn._raise_ssl_error(conn._ssl, ret)
        except SSL.Error as exc:
            later = exc
    return bytes(view[:total]), later


def write_records(ssl: Any, ptr: Any, n: int) -> tuple[int, int]:
    """SSL_write the ``n`` bytes at ``ptr`` until all is sent or OpenSSL
    stops: ``(bytes sent, SSL_get_error of the call that stopped, or 0)``.
    Partial writes are on (pyOpenSSL's default), so one call writes one
    record; a call that stopped may hold part of the next record, and its
    retry must pass the same bytes again (ACCEPT_MOVING_WRITE_BUFFER lets
    them move). The error queue is left for the caller to read."""
    total = 0
    while total < n:
        sent = lib.SSL_write(ssl, ptr + total, n - total)
        if sent <= 0:
            return total, lib.SSL_get_error(ssl, sent)
        total += sent
    return total, 0


def send_records(conn: SSL.Connection, data: bytes) -> tuple[int, bool]:
    """What OpenSSL and the socket take of ``data`` now, through
    :func:`write_records` (one cffi call per record, not one pyOpenSSL
    call): ``(bytes sent, whether OpenSSL stopped for the socket)``. On a
    TLS error it stops and drains the error queue: the caller's waiting
    retry calls OpenSSL again and reports it."""
    total, err = write_records(conn._ssl, ffi.from_buffer(data), len(data))
    if err and err != _WANT_WRITE and err != _WANT_READ:
        with contextlib.suppress(SSL.Error):
            conn._raise_ssl_error(conn._ssl, -1)
        return total, False
    return total, bool(err)


def read_plain(fd: int, size: int) -> bytes:
    """``os.read(fd, size)`` through the thread's batch buffer (BlockingIOError
    and OSError as os.read raises them). os.read allocates ``size`` bytes
    first: above glibc's mmap threshold (128 KiB) that is an mmap, mremap and
    munmap per read, 15 us for a 200-byte read against 3 us through a buffer."""
    try:
        view = _batches.view
    except AttributeError:
        view = _batch()[0]
    n = os.readv(fd, (view[:size] if size < _BATCH else view,))
    return bytes(view[:n])


def discard_unread(fd: int, chunk: int = 65536, reads: int = 4) -> None:
    """Read what already arrived and nobody will read, a bounded amount (a
    peer still sending gets its RST). Closing a socket with unread bytes
    sends a RST, and a RST can destroy the alert or close_notify we just
    wrote before the peer reads it (OpenSSL reads only what it needs:
    garbage or a refused peer's next flight stays)."""
    with contextlib.suppress(OSError):
        for _ in range(reads):
            if len(os.read(fd, chunk)) < chunk:
                return


def _unexpected_eof(err: int) -> bool:
    """A TCP EOF without close_notify: OpenSSL 3 reports it as an SSL error
    with reason "unexpected eof while reading", older ones as SYSCALL/0."""
    if err == lib.SSL_ERROR_SYSCALL:
        return lib.ERR_peek_error() == 0 and ffi.errno in (0, errno.EAGAIN)
    if err == lib.SSL_ERROR_SSL:
        reason = lib.ERR_reason_error_string(lib.ERR_peek_error())
        return reason != ffi.NULL and b"unexpected eof" in ffi.string(reason)
    return False


def ssl_error_text(err: int) -> str:
    code = lib.ERR_peek_error()
    if code:
        reason = lib.ERR_reason_error_string(code)
        if reason != ffi.NULL:
            return bytes(ffi.string(reason)).decode("ascii", "replace")
    if err == lib.SSL_ERROR_SYSCALL:
        return os.strerror(ffi.errno) if ffi.errno else "connection reset"
    return f"SSL error {err}"


def ssl_pending(ssl: Any) -> int:
    """Bytes OpenSSL has decrypted but not handed out (no fd readiness shows them)."""
    return int(lib.SSL_pending(ssl))


def pin(data: memoryview) -> Any:
    """A cffi pointer to ``data`` for SSL_write, kept while a write is pending."""
    return ffi.from_buffer(data)


def send_close_notify(ssl: Any, name: str) -> bool:
    """SSL_shutdown once: True when close_notify is out, False when OpenSSL
    must wait for the socket; Broken on failure."""
    lib.ERR_clear_error()
    ret = lib.SSL_shutdown(ssl)
    if ret < 0:
        err = lib.SSL_get_error(ssl, ret)
        if err in (lib.SSL_ERROR_WANT_WRITE, lib.SSL_ERROR_WANT_READ):
            return False
        raise Broken(name, f"close_notify failed ({ssl_error_text(err)})")
    return True


# -- pyOpenSSL's errors (proxy.tls.stream's calls; peer_alert for the trio relay) ----


def is_unexpected_eof(exc: SSL.Error) -> bool:
    # OpenSSL 3+ reports a TCP EOF without close_notify as an SSL error;
    # pyOpenSSL reports older ones as SysCallError(-1, "Unexpected EOF").
    if isinstance(exc, SSL.SysCallError):
        return bool(exc.args) and exc.args[0] == -1
    return "unexpected eof" in str(exc).lower()


def classify_handshake_error(exc: SSL.Error) -> tuple[str, str]:
    text = str(exc)
    lowered = text.lower()
    if "peer did not return a certificate" in lowered or "certificate required" in lowered:
        return "no_peer_certificate", "peer presented no certificate"
    if "unsupported protocol" in lowered or "protocol version" in lowered:
        return "tls_version_refused", "peer offered no TLS version we accept"
    if "wrong version number" in lowered or "http request" in lowered or "packet length" in lowered:
        return "tls_error", "peer did not speak TLS"
    if isinstance(exc, SSL.SysCallError) or is_unexpected_eof(exc):
        return "tls_error", "connection closed during the TLS handshake"
    return "tls_error", f"TLS handshake failed: {text}"


def peer_alert(exc: BaseException | None) -> str | None:
    """The TLS alert a peer sent us, if ``exc`` (or what caused it) is one."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, SSL.Error) and "alert" in str(exc).lower():
            return str(exc)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
