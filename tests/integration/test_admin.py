"""The admin endpoint over real loopback sockets: routes, keep-alive, HEAD,
405/404, and garbage that never stops the server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import h11
import pytest
import trio
import trio.testing

from proxy.metrics import Metrics
from proxy.netaddr import HostPort
from proxy.runtime.admin import AdminServer, Response


class Ready:
    def __init__(self) -> None:
        self.ready = False
        self.reason = "identity not loaded"

    def __call__(self) -> tuple[bool, str]:
        return self.ready, self.reason


class Client:
    """One HTTP/1.1 connection, driven by an h11 client state machine."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, address: str) -> Client:
        host, port = address.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        fields = [("host", "admin"), *headers]
        if body:
            fields.append(("content-length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=fields))
        assert out is not None
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, b"".join(chunks)
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def aclose(self) -> None:
        await self.stream.aclose()


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key == name.encode():
            return bytes(value).decode()
    return None


async def read_until_eof(stream: trio.SocketStream, deadline: float = 10) -> bytes:
    """Everything until the server closes; fails (rather than hangs) after ``deadline``."""
    data = b""
    with trio.fail_after(deadline):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def raw(address: str, payload: bytes) -> bytes:
    """Send ``payload`` on a fresh connection and read until the server closes."""
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(payload)
        return await read_until_eof(stream)


@pytest.fixture
def ready() -> Ready:
    return Ready()


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.connection("hr-api", "inbound", "allow", "peer_allowed")
    return m


@pytest.fixture
def server(metrics: Metrics, ready: Ready) -> AdminServer:
    return AdminServer(HostPort("127.0.0.1", 0), metrics, ready, max_header_bytes=4096)


@pytest.fixture
async def address(server: AdminServer) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        bound: str = await nursery.start(server.serve)
        yield bound
        nursery.cancel_scope.cancel()


async def test_binds_where_configured(address: str) -> None:
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0


async def test_healthz(address: str) -> None:
    client = await Client.open(address)
    response, body = await client.request("GET", "/healthz")
    assert response.status_code == 200 and body == b"ok\n"
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    await client.aclose()


async def test_readyz_follows_readiness(address: str, ready: Ready) -> None:
    client = await Client.open(address)
    response, body = await client.request("GET", "/readyz")
    assert response.status_code == 503 and body == b"not ready: identity not loaded\n"
    ready.ready = True
    response, body = await client.request("GET", "/readyz")
    assert response.status_code == 200 and body == b"ready\n"
    await client.aclose()


async def test_metrics(address: str, metrics: Metrics) -> None:
    client = await Client.open(address)
    response, body = await client.request("GET", "/metrics")
    assert response.status_code == 200
    assert header(response, "content-type") == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE agent_proxy_connections_total counter" in body
    assert b'listener="hr-api"' in body
    metrics.connection("egress", "outbound", "deny", "peer_not_allowed")
    _, body = await client.request("GET", "/metrics?x=1")  # the query string is ignored
    assert b'listener="egress"' in body
    await client.aclose()


async def test_not_found_and_method_not_allowed(address: str) -> None:
    client = await Client.open(address)
    response, _ = await client.request("GET", "/nope")
    assert response.status_code == 404
    response, _ = await client.request("POST", "/healthz", body=b"x")
    assert response.status_code == 405
    assert header(response, "allow") == "GET, HEAD"
    response, _ = await client.request("DELETE", "/metrics")
    assert response.status_code == 405
    await client.aclose()


async def test_keep_alive_and_head(address: str) -> None:
    client = await Client.open(address)
    response, body = await client.request("GET", "/healthz")
    assert response.status_code == 200 and body == b"ok\n"
    response, body = await client.request("HEAD", "/healthz")
    assert response.status_code == 200 and body == b""
    assert header(response, "content-length") == "3"
    # Still the same connection: HEAD sent no body that would confuse this one.
    response, body = await client.request("GET", "/readyz")
    assert response.status_code == 503
    await client.aclose()


async def test_pipelined_requests(address: str) -> None:
    data = await raw(
        address,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert data.count(b"HTTP/1.1 ") == 2
    assert data.index(b"ok\n") < data.index(b"not ready")


async def test_connection_close_is_honoured(address: str) -> None:
    data = await raw(address, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok\n")


async def test_http_1_0(address: str) -> None:
    data = await raw(address, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok\n")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"\r\n\r\n\r\nHELLO\r\n\r\n",
    ],
    ids=["tls-hello", "http-0.9", "bad-header", "bad-length", "noise"],
)
async def test_garbage_gets_400_and_the_server_keeps_serving(address: str, garbage: bytes) -> None:
    data = await raw(address, garbage)
    assert data.startswith(b"HTTP/1.1 400 "), data
    client = await Client.open(address)
    response, _ = await client.request("GET", "/healthz")
    assert response.status_code == 200
    await client.aclose()


async def test_oversized_headers_are_refused(address: str) -> None:
    data = await raw(
        address, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 431 ")
    client = await Client.open(address)
    response, _ = await client.request("GET", "/healthz")
    assert response.status_code == 200
    await client.aclose()


async def test_eof_mid_request_is_harmless(address: str) -> None:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHo")
    await stream.send_eof()
    data = await read_until_eof(stream)
    assert data == b"" or data.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()
    client = await Client.open(address)
    response, _ = await client.request("GET", "/healthz")
    assert response.status_code == 200
    await client.aclose()


async def test_added_routes_and_handler_errors(server: AdminServer, address: str) -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def release(request: h11.Request, body: bytes) -> Response:
        seen.append((bytes(request.target), body))
        return 202, [("content-type", "application/json")], b'{"released":true}'

    async def broken(request: h11.Request, body: bytes) -> Response:
        raise RuntimeError("bug")

    server.add_route("POST", "/quarantine/release", release)
    server.add_route("GET", "/broken", broken)
    client = await Client.open(address)
    response, body = await client.request("POST", "/quarantine/release?id=7", body=b"{}")
    assert response.status_code == 202 and body == b'{"released":true}'
    assert seen == [(b"/quarantine/release?id=7", b"{}")]
    response, _ = await client.request("GET", "/quarantine/release")
    assert response.status_code == 405 and header(response, "allow") == "POST"
    response, _ = await client.request("GET", "/broken")
    assert response.status_code == 500
    response, _ = await client.request("GET", "/healthz")  # same connection, still fine
    assert response.status_code == 200
    await client.aclose()


async def test_expect_100_continue(server: AdminServer, address: str) -> None:
    async def echo(request: h11.Request, body: bytes) -> Response:
        return 200, [], body

    server.add_route("POST", "/echo", echo)
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await stream.receive_some(65536)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await stream.send_all(b"hello")
    data = b""
    while not data.endswith(b"hello"):
        data += await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 200 ")
    await stream.aclose()


async def test_body_too_large(metrics: Metrics, ready: Ready) -> None:
    server = AdminServer(HostPort("127.0.0.1", 0), metrics, ready, max_body_bytes=10)

    async def sink(request: h11.Request, body: bytes) -> Response:
        return 200, [], b""

    server.add_route("POST", "/sink", sink)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve)
        data = await raw(
            address, b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
        )
        assert data.startswith(b"HTTP/1.1 413 ")
        nursery.cancel_scope.cancel()


async def test_idle_connections_are_closed(
    metrics: Metrics, ready: Ready, autojump_clock: trio.testing.MockClock
) -> None:
    server = AdminServer(HostPort("127.0.0.1", 0), metrics, ready, idle_timeout=30)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve)
        client = await Client.open(address)
        response, _ = await client.request("GET", "/healthz")
        assert response.status_code == 200
        start = trio.current_time()
        assert await read_until_eof(client.stream, 60) == b""  # the server hung up
        assert trio.current_time() - start >= 30
        # A client that starts a request and stalls gets the same deadline.
        host, port = address.rsplit(":", 1)
        slow = await trio.open_tcp_stream(host, int(port))
        await slow.send_all(b"GET /healthz HTTP/1.1\r\n")
        assert await read_until_eof(slow, 60) == b""
        await slow.aclose()
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_loopback_only_routes_refuse_other_clients() -> None:
    """Quarantine release is for loopback clients only, even when the admin
    endpoint listens more widely (pods). The socket's peer decides; here the
    dispatcher is driven directly with a non-loopback verdict."""
    import h11

    from proxy.metrics import Metrics
    from proxy.netaddr import HostPort
    from proxy.runtime.admin import AdminServer

    server = AdminServer(HostPort("127.0.0.1", 0), Metrics(), lambda: (True, "ready"))

    async def release(
        request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        return 200, [], b"released\n"

    server.add_route("POST", "/guard/quarantines/release", release, loopback_only=True)
    request = h11.Request(
        method="POST", target="/guard/quarantines/release", headers=[("host", "a")]
    )
    assert (await server._dispatch(request, b"", False))[0] == 403
    assert (await server._dispatch(request, b"", True))[0] == 200
    health = h11.Request(method="GET", target="/healthz", headers=[("host", "a")])
    assert (await server._dispatch(health, b"", False))[0] == 200
