"""In-process helpers for HTTP-mode tests: a recording backend on loopback,
listeners built from real config dicts, and a raw TLS client."""

from __future__ import annotations

import json
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from proxy.config import parse_config
from proxy.identity import IdentityState
from proxy.runtime.http_listeners import HttpInboundListener, HttpOutboundListener
from tests.integration.tls_support import MemoryAudit, snapshot
from tests.pki import Issued, TestCA


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]


@dataclass
class RecordingBackend:
    """An HTTP/1.1 origin that records what reached it and echoes a summary."""

    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    connections: int = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        try:
            while True:
                request = None
                body = bytearray()
                trailers: list[tuple[str, str]] = []
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        trailers = [(n.decode(), v.decode()) for n, v in event.headers]
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                seen = Seen(
                    request.method.decode(),
                    request.target.decode(),
                    [(n.decode(), v.decode()) for n, v in request.headers],
                    bytes(body),
                    trailers,
                )
                self.seen.append(seen)
                if b"/big/" in request.target:
                    size = int(request.target.rsplit(b"/", 1)[1])
                    await self._stream_body(stream, conn, size)
                else:
                    payload = json.dumps(
                        {
                            "method": seen.method,
                            "target": seen.target,
                            "body_len": len(body),
                            "xfcc": seen.header("x-forwarded-client-cert"),
                        }
                    ).encode()
                    await stream.send_all(
                        conn.send(
                            h11.Response(
                                status_code=200,
                                headers=[
                                    ("content-type", "application/json"),
                                    ("content-length", str(len(payload))),
                                    ("connection", "keep-alive"),
                                    ("keep-alive", "timeout=5"),
                                ],
                            )
                        )
                    )
                    if request.method != b"HEAD":  # same head as GET, no body
                        await stream.send_all(conn.send(h11.Data(data=payload)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()

    async def _stream_body(
        self, stream: trio.SocketStream, conn: h11.Connection, size: int
    ) -> None:
        await stream.send_all(
            conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
        )
        chunk = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            await stream.send_all(conn.send(h11.Data(data=piece)))
            sent += len(piece)
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(trio.serve_tcp, self._handle, 0)
        self.port = int(listeners[0].socket.getsockname()[1])
        return self.port


def identity_section() -> dict[str, Any]:
    # parse_config needs a section; these listeners get their identity directly.
    return {"source": "files", "cert": "c.pem", "key": "k.pem", "bundle": "b.pem"}


async def start_inbound(
    nursery: trio.Nursery,
    *,
    issued: Issued,
    cas: tuple[TestCA, ...],
    target_port: int,
    rules: list[dict[str, Any]],
    audit: MemoryAudit,
    **extra: Any,
) -> tuple[HttpInboundListener, int]:
    config = parse_config(
        {
            "identity": identity_section(),
            "inbound": [
                {
                    "name": "hr-api",
                    "listen": "127.0.0.1:0",
                    "protocol": "http",
                    "target": f"127.0.0.1:{target_port}",
                    "rules": rules,
                    **extra,
                }
            ],
        }
    )
    listener = HttpInboundListener(
        config.inbound[0], IdentityState(snapshot(issued, *cas)), audit.sink
    )
    bound = await nursery.start(listener.serve, nursery)
    return listener, int(bound[0].rpartition(":")[2])


async def start_outbound(
    nursery: trio.Nursery,
    *,
    issued: Issued,
    cas: tuple[TestCA, ...],
    protocol: str,
    routes: list[dict[str, Any]],
    audit: MemoryAudit,
    **extra: Any,
) -> tuple[HttpOutboundListener, int]:
    config = parse_config(
        {
            "identity": identity_section(),
            "outbound": [
                {
                    "name": "egress",
                    "listen": "127.0.0.1:0",
                    "protocol": protocol,
                    "routes": routes,
                    **extra,
                }
            ],
        }
    )
    listener = HttpOutboundListener(
        config.outbound[0], IdentityState(snapshot(issued, *cas)), audit.sink
    )
    bound = await nursery.start(listener.serve, nursery)
    return listener, int(bound[0].rpartition(":")[2])


def client_context(issued: Issued) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    directory = Path(tempfile.mkdtemp())
    cert, key = issued.write(directory)
    ctx.load_cert_chain(cert, key)
    return ctx


async def tls_connect(port: int, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(raw, ctx, server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def read_response(
    stream: trio.abc.Stream, method: bytes = b"GET", deadline: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """One response, parsed with h11 as a client would."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    status = 0
    headers: dict[str, str] = {}
    body = bytearray()
    with trio.fail_after(deadline):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {n.decode(): v.decode() for n, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, headers, bytes(body)


Answer = tuple[str, bytes]  # content type, body


async def serve_h11(stream: trio.SocketStream, respond: Any) -> None:
    """A keep-alive HTTP/1.1 origin: ``respond(request, body) -> (content
    type, payload)`` answers each request with a 200."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request, body = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data and conn.their_state is h11.IDLE:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            content_type, payload = respond(request, body)
            await stream.send_all(
                conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            ("content-type", content_type),
                            ("content-length", str(len(payload))),
                        ],
                    )
                )
            )
            await stream.send_all(conn.send(h11.Data(data=payload)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        return
    finally:
        await stream.aclose()


class InboundEnv:
    """A recording backend behind an inbound listener, and a client identity."""

    def __init__(
        self, backend: RecordingBackend, port: int, audit: MemoryAudit, client: Issued
    ) -> None:
        self.backend, self.port, self.audit, self.client = backend, port, audit, client

    async def connect(self) -> trio.SSLStream[trio.SocketStream]:
        return await tls_connect(self.port, client_context(self.client))

    async def exchange(
        self, raw: bytes, method: bytes = b"GET"
    ) -> tuple[int, dict[str, str], bytes]:
        stream = await self.connect()
        try:
            await stream.send_all(raw)
            return await read_response(stream, method)
        finally:
            await stream.aclose()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.audit.records() if r["event"] == name]

    def requests(self) -> list[dict[str, Any]]:
        return self.events("http.request")

    async def wait_for(self, name: str, deadline: float = 20) -> dict[str, Any]:
        """The first ``name`` record, once it is written."""
        with trio.fail_after(deadline):
            while not (found := self.events(name)):
                await trio.sleep(0.01)
        return found[0]


async def inbound_env(
    nursery: trio.Nursery,
    hr: Issued,
    ca: TestCA,
    client: Issued,
    rules: list[dict[str, Any]],
    **extra: Any,
) -> InboundEnv:
    backend = RecordingBackend()
    await backend.start(nursery)
    audit = MemoryAudit()
    _, port = await start_inbound(
        nursery, issued=hr, cas=(ca,), target_port=backend.port, rules=rules, audit=audit, **extra
    )
    return InboundEnv(backend, port, audit, client)
