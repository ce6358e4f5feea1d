"""The admin endpoint: /healthz, /readyz and /metrics over plain HTTP/1.1.

Theory of operation: one accept loop (``trio.serve_listeners``) and one
task per connection. Each connection is an h11 server state machine driven
by a small loop: read one request (head and body) under a deadline, look the
path up in the route table, answer, and either start the next cycle
(keep-alive) or close. The deadline covers both the idle wait before a
request and the request itself, so neither an idle nor a slow client can
hold a connection longer than ``idle_timeout``.

Safety: the endpoint is plaintext and unauthenticated, so it binds only the
address it is given, and the config layer allows a non-loopback address only
with ``admin.allow_public = true`` (invariant 4). Bad input from a client
(garbage, oversized headers, a body too large) gets a 4xx and the
connection closes; an exception in a handler gets a 500. Nothing a client
sends ends the server (invariant 5).

Routes are extensible: :meth:`AdminServer.add_route` registers
``async handler(request, body) -> (status, headers, body)``. A GET route also
answers HEAD; a known path with an unregistered method is a 405 with Allow.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus

import h11
import structlog
import trio

from proxy.http.conn import linger_close
from proxy.metrics import Metrics
from proxy.netaddr import HostPort, format_sockaddr
from proxy.runtime.listener import ListenError, listen_error

log = structlog.get_logger("agent_proxy")

Headers = Sequence[tuple[str, str]]
Response = tuple[int, Headers, bytes]
Handler = Callable[[h11.Request, bytes], Awaitable[Response]]

_TEXT = "text/plain; charset=utf-8"
_READ_SIZE = 16384


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


class _Close(Exception):
    """End this connection now (the peer went away, or broke the protocol
    after we could no longer answer)."""


class AdminServer:
    def __init__(
        self,
        listen: HostPort,
        metrics: Metrics,
        readiness: Callable[[], tuple[bool, str]],
        *,
        idle_timeout: float = 30.0,
        max_header_bytes: int = 16384,
        max_body_bytes: int = 65536,
        max_connections: int = 64,
    ) -> None:
        self.listen = listen
        self.metrics = metrics
        self.readiness = readiness
        self.idle_timeout = idle_timeout
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.active = 0
        self.bound: list[str] = []
        self.origin: str | None = None  # how the operator named it ("--admin")
        self._routes: dict[str, dict[str, Handler]] = {}
        self._loopback_only: set[str] = set()
        self.add_route("GET", "/healthz", self._healthz)
        self.add_route("GET", "/readyz", self._readyz)
        self.add_route("GET", "/metrics", self._metrics)

    def add_route(
        self, method: str, path: str, handler: Handler, *, loopback_only: bool = False
    ) -> None:
        """Serve ``method path`` (exact path; the query string is ignored).
        ``loopback_only`` routes answer 403 to any client not on loopback,
        even when the admin endpoint itself listens more widely."""
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        self._routes.setdefault(path, {})[method.upper()] = handler
        if loopback_only:
            self._loopback_only.add(path)

    # -- built-in routes --------------------------------------------------

    async def _healthz(self, request: h11.Request, body: bytes) -> Response:
        return 200, [("content-type", _TEXT)], b"ok\n"

    async def _readyz(self, request: h11.Request, body: bytes) -> Response:
        ready, reason = self.readiness()
        if ready:
            return 200, [("content-type", _TEXT)], b"ready\n"
        text = " ".join(f"not ready: {reason}".splitlines()) + "\n"
        return 503, [("content-type", _TEXT)], text.encode("utf-8", "replace")

    async def _metrics(self, request: h11.Request, body: bytes) -> Response:
        return 200, [("content-type", Metrics.CONTENT_TYPE)], self.metrics.render()

    # -- serving ----------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(
                self.listen.port, host=self.listen.host or None
            )
        except OSError as exc:
            raise ListenError(listen_error("admin", self.listen, exc, self.origin)) from None
        self.bound = [format_sockaddr(sock.socket.getsockname()) for sock in listeners]
        log.info("admin listening", address=self.bound[0], addresses=self.bound)
        task_status.started(self.bound[0])
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self.active >= self.max_connections:
            await stream.aclose()
            return
        self.active += 1
        try:
            await self._serve_connection(stream)
        except _Close:
            await linger_close(stream)
        except Exception:  # invariant 5: one connection's failure is never fatal
            log.exception("admin connection failed")
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()[0]
            loopback = ipaddress.ip_address(peer.split("%")[0]).is_loopback
        except (OSError, ValueError, IndexError):
            loopback = False
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        while True:
            request: h11.Request | None = None
            body = b""
            try:
                with trio.move_on_after(self.idle_timeout):
                    request, body = await self._read_request(stream, conn)
                if request is None:  # idle or slow: just close
                    return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._send_error(stream, conn, status, f"{status} {_phrase(status)}\n")
                return
            except _BodyTooLarge:
                await self._send_error(stream, conn, 413, "413 request body too large\n")
                return
            status, headers, payload = await self._dispatch(request, body, loopback)
            await self._respond(stream, conn, request, status, headers, payload)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    go_on = h11.InformationalResponse(status_code=100, headers=[])
                    await self._send(stream, conn, go_on)
                try:
                    data = await stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise _Close from None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                # h11 caps only an *incomplete* head; a complete one that
                # arrived in one read is measured here.
                size = len(event.method) + len(event.target) + 12
                size += sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > self.max_header_bytes:
                    raise h11.RemoteProtocolError("request head too large", 431)
                request = event
                size = 0
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body_bytes:
                    raise _BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                # A clean close between requests; one mid-request is h11's error.
                raise _Close
            elif event is h11.PAUSED:  # pragma: no cover - we never read past DONE
                raise _Close

    async def _dispatch(self, request: h11.Request, body: bytes, loopback: bool) -> Response:
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        methods = self._routes.get(path)
        if methods is None:
            return 404, [("content-type", _TEXT)], b"not found\n"
        if path in self._loopback_only and not loopback:
            return 403, [("content-type", _TEXT)], b"loopback only\n"
        handler = methods.get(method)
        if handler is None and method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            return (
                405,
                [("content-type", _TEXT), ("allow", ", ".join(allowed))],
                b"method not allowed\n",
            )
        try:
            return await handler(request, body)
        except Exception:
            log.exception("admin handler failed", method=method, path=path)
            return 500, [("content-type", _TEXT)], b"internal error\n"

    async def _respond(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request,
        status: int,
        headers: Headers,
        payload: bytes,
    ) -> None:
        fields = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
        fields += [("content-length", str(len(payload))), ("cache-control", "no-store")]
        await self._send(stream, conn, h11.Response(status_code=status, headers=fields))
        if request.method != b"HEAD" and payload:
            await self._send(stream, conn, h11.Data(data=payload))
        await self._send(stream, conn, h11.EndOfMessage())

    async def _send_error(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, text: str
    ) -> None:
        """Answer a broken request if h11 still lets us, then the caller closes."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        fields = [
            ("content-type", _TEXT),
            ("content-length", str(len(text))),
            ("connection", "close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError):
            await self._send(stream, conn, h11.Response(status_code=status, headers=fields))
            await self._send(stream, conn, h11.Data(data=text.encode()))
            await self._send(stream, conn, h11.EndOfMessage())

    async def _send(
        self, stream: trio.SocketStream, conn: h11.Connection, event: h11.Event
    ) -> None:
        data = conn.send(event)
        if not data:
            return
        try:
            with trio.move_on_after(self.idle_timeout) as scope:
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Close from None
        if scope.cancelled_caught:
            raise _Close


class _BodyTooLarge(Exception):
    pass
