"""A trio Stream that speaks TLS over pyOpenSSL memory BIOs.

Theory of operation: the SSL.Connection never touches a socket. Ciphertext
that OpenSSL produces accumulates in its outgoing memory BIO; whoever holds
``_send_lock`` drains that BIO and writes it to the transport, so records
reach the wire in the order OpenSSL made them. The receive path never
writes: in TLS 1.3 (renegotiation off) nothing SSL_read processes needs an
immediate answer; OpenSSL sends a KeyUpdate reply with our next write, and
no receive ever waits behind a sender blocked on a full socket. Incoming ciphertext is read
from the transport only by the single task allowed in ``receive_some`` (or
the handshake) and fed to the incoming BIO.

Errors mean what they mean for trio's own streams: ``ClosedResourceError``
when *we* closed this stream and then used it, ``BrokenResourceError`` when
the transport broke or the peer sent something TLS cannot accept. A failed
handshake raises :class:`TLSHandshakeError` (a ``BrokenResourceError``) that
carries the audit reason; its alert is flushed to the peer first.

TLS 1.3 half-close: ``send_eof`` sends close_notify and keeps reading, which
the protocol allows (RFC 8446, 6.1). A peer's close_notify reads as b"".
"""

from __future__ import annotations

import contextlib

import trio
from OpenSSL import SSL

from proxy.tls.context import TlsSide

_RECV_CHUNK = 65536
_BIO_DRAIN = 262144


class TLSHandshakeError(trio.BrokenResourceError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _classify_ssl_error(exc: BaseException) -> tuple[str, str]:
    text = str(exc)
    lowered = text.lower()
    if "peer did not return a certificate" in lowered or "certificate required" in lowered:
        return "no_peer_certificate", "peer presented no certificate"
    if "unsupported protocol" in lowered or "protocol version" in lowered:
        return "tls_version_refused", "peer offered no TLS version we accept"
    if "wrong version number" in lowered or "http request" in lowered or "packet length" in lowered:
        return "tls_error", "peer did not speak TLS"
    if isinstance(exc, SSL.SysCallError):
        return "tls_error", "connection closed during the TLS handshake"
    return "tls_error", f"TLS handshake failed: {text}"


class TLSStream(trio.abc.HalfCloseableStream):
    def __init__(self, transport: trio.abc.Stream, side: TlsSide) -> None:
        self.transport = transport
        self._conn, self.peer = side.new_connection()
        self._send_lock = trio.Lock()
        self._handshake_lock = trio.Lock()
        self._out: list[bytes] = []
        self._receiving = False
        self._sending = False
        self._handshake_done = False
        self._closed = False
        self._broken = False
        self._eof_sent = False
        self._dirty = True  # OpenSSL may have ciphertext for us to send
        self._transport_eof = False
        self.truncated = False  # the peer ended TCP without close_notify

    # -- plumbing ---------------------------------------------------------

    def _pull(self) -> None:
        """Move OpenSSL's pending ciphertext to ``_out``, keeping its order.

        Only after an operation that can write (``_dirty``): an empty memory
        BIO answers with an exception, and that costs more than the read. A
        short read means the BIO is empty, so no probing read follows it."""
        if not self._dirty:
            return
        self._dirty = False
        while True:
            try:
                chunk = self._conn.bio_read(_BIO_DRAIN)
            except SSL.WantReadError:
                return
            self._out.append(chunk)
            if len(chunk) < _BIO_DRAIN:
                return

    async def _flush(self) -> None:
        """Send everything queued, in the order OpenSSL produced it. Whoever
        holds ``_send_lock`` keeps sending until nothing is left, including
        records another task produced while it was blocked on the socket."""
        self._pull()
        if not self._out:
            return
        async with self._send_lock:
            while True:
                self._pull()
                if not self._out:
                    return
                data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                self._out.clear()
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._broken = True
                    raise trio.BrokenResourceError("transport broke while sending") from exc

    async def _read_transport(self) -> None:
        try:
            data = await self.transport.receive_some(_RECV_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken = True
            raise trio.BrokenResourceError("transport broke while receiving") from exc
        if data:
            self._conn.bio_write(data)
        else:
            self._transport_eof = True
            self._conn.bio_shutdown()

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._broken:
            raise trio.BrokenResourceError("TLS stream is broken")

    # -- handshake --------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake; the caller puts the deadline around it."""
        self._check_usable()
        async with self._handshake_lock:
            if self._handshake_done:
                await trio.lowlevel.checkpoint()
                return
            while True:
                try:
                    self._dirty = True
                    self._conn.do_handshake()
                    break
                except SSL.WantReadError:
                    await self._flush()
                    try:
                        await self._read_transport()
                    except trio.BrokenResourceError as exc:
                        raise TLSHandshakeError(
                            "tls_error", "connection closed during the TLS handshake"
                        ) from exc
                except SSL.Error as exc:
                    self._broken = True
                    await self._flush_alert()
                    if self.peer.reason is not None:
                        raise TLSHandshakeError(self.peer.reason, self.peer.message or "") from exc
                    reason, message = _classify_ssl_error(exc)
                    raise TLSHandshakeError(reason, message) from exc
            self._handshake_done = True
            try:
                # A TLS 1.3 server's last flight (session tickets) goes out
                # here; a peer that resets right after its Finished lands here.
                await self._flush()
            except trio.BrokenResourceError as exc:
                raise TLSHandshakeError(
                    "tls_error", "connection closed at the end of the TLS handshake"
                ) from exc

    async def _flush_alert(self) -> None:
        # Best effort: the peer should learn why, but a dead peer must not stall us.
        self._dirty = True
        self._pull()
        data = b"".join(self._out)
        self._out.clear()
        if not data:
            return
        with trio.move_on_after(1):
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
            ):
                await self.transport.send_all(data)

    # -- Stream API -------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_usable()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            if not self._handshake_done:
                await self.do_handshake()
            size = max_bytes or _RECV_CHUNK
            waited = False
            while True:
                try:
                    data = self._conn.recv(size)
                except SSL.WantReadError:
                    pass
                except SSL.ZeroReturnError:
                    data = b""
                    break
                except SSL.SysCallError as exc:
                    if not self._transport_eof:
                        self._broken = True
                        raise trio.BrokenResourceError(f"TLS error while receiving: {exc}") from exc
                    # TCP EOF without close_notify. Like stunnel and ghostunnel we
                    # read it as EOF (many clients never send close_notify); the
                    # flag lets the caller tell it from a clean close.
                    self.truncated = True
                    data = b""
                    break
                except SSL.Error as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS error while receiving: {exc}") from exc
                else:
                    break
                # No flush here: in TLS 1.3 nothing SSL_read processes needs
                # an answer now (OpenSSL sends a KeyUpdate reply with our next
                # write), and renegotiation is off.
                await self._read_transport()
                waited = True
            if not waited:
                await trio.lowlevel.checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_usable()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was already called")
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            if not self._handshake_done:
                await self.do_handshake()
            if data:
                try:
                    self._dirty = True
                    self._conn.sendall(data if isinstance(data, bytes) else bytes(data))
                except SSL.Error as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS error while sending: {exc}") from exc
            await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        async with self._send_lock:
            await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify; we can still receive (TLS 1.3 half-close)."""
        self._check_usable()
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        if not self._handshake_done:
            await self.do_handshake()
        self._eof_sent = True
        try:
            self._dirty = True
            self._conn.shutdown()
        except SSL.Error as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS error while closing: {exc}") from exc
        await self._flush()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshake_done and not self._broken and not self._eof_sent:
                self._eof_sent = True
                try:
                    self._dirty = True
                    self._conn.shutdown()
                except SSL.Error:
                    pass
                else:
                    await self._flush_alert()
        finally:
            await self.transport.aclose()
