"""Real loopback connections for the reactor tests: TCP pairs, and TLS on
the socket with pyOpenSSL contexts built straight from the test PKI (the
reactor moves bytes; peer verification is proxy.tls's business and tested
there)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from OpenSSL import SSL, crypto

from tests.pki import Issued, TestCA

_T = TypeVar("_T")

_CA = TestCA.create("reactor.test")
SERVER = _CA.issue("spiffe://reactor.test/svc/server")
CLIENT = _CA.issue("spiffe://reactor.test/agent/client")


def context(issued: Issued, *, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.use_certificate(issued.cert)
    ctx.use_privatekey(issued.key)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(_CA.cert))  # type: ignore[union-attr]
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server else 0)
    ctx.set_verify(mode, lambda conn, cert, errnum, depth, ok: bool(ok))
    return ctx


SERVER_CTX = context(SERVER, server=True)
CLIENT_CTX = context(CLIENT, server=False)


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one real loopback TCP connection (connector, accepted)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        connector = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listeners[0].accept()
    return connector, accepted


@dataclass
class SockTls:
    """pyOpenSSL on a trio socket: what the reactor needs (``fileno``,
    ``ssl_connection``) plus just enough of a stream for a test peer."""

    stream: trio.SocketStream
    conn: SSL.Connection

    @classmethod
    def over(cls, stream: trio.SocketStream, *, server: bool) -> SockTls:
        # pyOpenSSL takes anything with fileno(); its stubs name only socket.socket.
        sock: Any = stream.socket
        conn = SSL.Connection(SERVER_CTX if server else CLIENT_CTX, sock)
        if server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        return cls(stream, conn)

    @property
    def fileno(self) -> int:
        return self.stream.socket.fileno()

    @property
    def ssl_connection(self) -> SSL.Connection:
        return self.conn

    async def _call(self, op: Callable[..., _T], *args: object) -> _T:
        while True:
            try:
                return op(*args)
            except SSL.WantReadError:
                await trio.lowlevel.wait_readable(self.fileno)
            except SSL.WantWriteError:
                await trio.lowlevel.wait_writable(self.fileno)

    async def handshake(self) -> None:
        await self._call(self.conn.do_handshake)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._call(self.conn.send, view[:262144])
            view = view[sent:]

    async def receive_some(self, n: int = 65536) -> bytes:
        try:
            return bytes(await self._call(self.conn.recv, n))
        except SSL.ZeroReturnError:
            return b""

    async def send_eof(self) -> None:
        await self._call(self.conn.shutdown)

    def close(self) -> None:
        self.stream.socket.close()


async def tls_pair() -> tuple[SockTls, SockTls]:
    """A TLS 1.3 connection on loopback, handshake done: (client, server)."""
    connector, accepted = await tcp_pair()
    client, server = SockTls.over(connector, server=False), SockTls.over(accepted, server=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.handshake)
        nursery.start_soon(server.handshake)
    return client, server


def reset(sock: trio.socket.SocketType) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def read_all(stream: trio.SocketStream | SockTls) -> bytes:
    out = bytearray()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return bytes(out)
        out += data
