"""The client and upstream connections on the parser seam, over trio memory
streams against an origin that answers with raw bytes (no sockets): framing
re-decided for the client, and when either connection may be reused."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Hashable

import pytest
import trio
import trio.testing

from proxy.http.conn import HEAD_RECV_BYTES, Downstream, Limits
from proxy.http.exchange import PeerError, RequestOutcome
from proxy.http.pool import UpstreamPool
from proxy.http.session import HttpSession
from proxy.http.upstream import Upstream
from proxy.http.wire import Body, Head
from tests.unit.test_exchange import PathRouter


async def raw_origin(stream: trio.abc.Stream, answer: bytes, heads: list[bytes]) -> None:
    """Reads request heads (no bodies) and answers each with ``answer``;
    closes after it when the answer is framed by the close."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        heads.append(head)
        await stream.send_all(answer)
        if b"content-length" not in answer.lower():
            await stream.aclose()
            return


def _session(
    nursery: trio.Nursery,
    server: trio.abc.Stream,
    answer: bytes,
    heads: list[bytes],
    emit: Callable[[RequestOutcome], None],
) -> HttpSession:
    """A session on ``server`` whose upstreams are raw_origin answering ``answer``."""
    limits = Limits()

    async def connect(key: Hashable) -> Upstream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(raw_origin, theirs, answer, heads)
        return Upstream(ours, key, limits)

    pool = UpstreamPool(connect)
    return HttpSession(Downstream(server, limits), PathRouter(), pool, limits, emit)


async def session_against(raw: bytes, answer: bytes) -> tuple[bytes, list[RequestOutcome], int]:
    """What the client got, the records, and how many upstream connections."""
    client, server = trio.testing.memory_stream_pair()
    records: list[RequestOutcome] = []
    heads: list[bytes] = []
    async with trio.open_nursery() as nursery:
        session = _session(nursery, server, answer, heads, records.append)
        pool = session.pool

        async def serve() -> None:
            await session.run()
            await server.aclose()

        nursery.start_soon(serve)
        await client.send_all(raw)
        await client.send_eof()
        received = b""
        with trio.fail_after(10):
            while data := await client.receive_some(65536):
                received += data
        nursery.cancel_scope.cancel()
    return received, records, pool.connects


GET = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


async def test_keep_alive_reuses_both_connections() -> None:
    raw, records, connects = await session_against(GET * 3, OK)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 3 and raw.endswith(b"hi")
    assert connects == 1  # the upstream was pooled and reused
    assert [r.outcome for r in records] == ["served"] * 3


async def test_an_answer_read_until_close_is_chunked_for_the_client() -> None:
    raw, records, connects = await session_against(GET * 2, b"HTTP/1.1 200 OK\r\n\r\nstream")
    first, _, rest = raw.partition(b"0\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in first and first.endswith(b"6\r\nstream\r\n")
    # The client connection stays; the upstream one could not be pooled.
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert connects == 2 and len(records) == 2


async def test_an_http10_client_gets_close_and_the_connection_ends() -> None:
    raw, records, _ = await session_against(b"GET /ok HTTP/1.0\r\nHost: x\r\n\r\n" + GET, OK)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 1  # the second request is never read
    assert b"\r\nConnection: close\r\n" in raw and raw.endswith(b"hi")
    assert len(records) == 1


async def test_connection_close_from_the_client_ends_after_the_answer() -> None:
    raw, records, _ = await session_against(
        b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET, OK
    )
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 1 and b"\r\nConnection: close\r\n" in raw
    assert len(records) == 1


async def test_an_unrequested_101_never_reaches_the_client() -> None:
    raw, records, _ = await session_against(
        GET, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nRAW"
    )
    assert raw.startswith(b"HTTP/1.1 502 ") and b"101" not in raw.split(b"\r\n")[0]
    assert b"RAW" not in raw
    assert records[0].reason == "bad_upstream_response"


async def _session_ends_before_the_client_closes(raw: bytes) -> bool:
    """Send ``raw`` and keep our side open: does the session end by itself
    (no lingering close waiting for the client's EOF)?"""
    client, server = trio.testing.memory_stream_pair()
    ended = trio.Event()
    async with trio.open_nursery() as nursery:
        session = _session(nursery, server, OK, [], lambda _: None)

        async def serve() -> None:
            await session.run()
            ended.set()

        nursery.start_soon(serve)
        await client.send_all(raw)
        received = b""
        with trio.fail_after(10):
            while b"hi" not in received:
                received += await client.receive_some(65536)
        await trio.testing.wait_all_tasks_blocked()
        result = ended.is_set()
        nursery.cancel_scope.cancel()
    return result


async def test_a_client_that_said_close_is_not_lingered_on() -> None:
    """All it sent is read and it promised nothing more: we close at once."""
    assert await _session_ends_before_the_client_closes(
        b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )


async def test_unread_bytes_after_a_close_still_get_a_lingering_close() -> None:
    """Bytes past the request would make closing send RST, which can destroy
    our answer before the client reads it: drain first (RFC 9112 9.6)."""
    assert not await _session_ends_before_the_client_closes(
        b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /more"
    )


async def test_an_upstream_that_timed_out_is_not_kept_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each upstream timeout is a 504 of its own: once the connection is
    dropped nothing holds it (a shared exception raised again and again
    kept every timed-out connection's frames, and so the connection)."""
    refs = []
    for _ in range(3):
        ours, theirs = trio.testing.memory_stream_pair()
        up = Upstream(ours, "k", Limits(response_timeout=5))
        with pytest.raises(PeerError) as caught:
            await up.next_event(up.limits.response_timeout)  # theirs never answers
        assert (caught.value.status, caught.value.reason) == (504, "upstream_timeout")
        refs.append(weakref.ref(up))
        del up, ours, theirs, caught
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


async def test_the_read_that_starts_an_answer_leaves_a_large_body_unread() -> None:
    """With a whole 1 MiB answer waiting, the first read takes at most
    HEAD_RECV_BYTES: the rest of the body is left for the reactor to move
    (proxy.runtime.direct), not for the parser and the relay."""
    ours, theirs = trio.testing.memory_stream_pair()
    up = Upstream(ours, "k", Limits(response_timeout=5))
    head, size = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n", 1 << 20
    await theirs.send_all(head + b"x" * size)  # all of it in our stream at once
    assert isinstance(await up.next_event(5), Head)
    first = await up.next_event(5)  # the body bytes that read took, from the parser
    assert isinstance(first, Body) and len(first.data) == HEAD_RECV_BYTES - len(head)
    assert up.parser.body_unbuffered() == size - len(first.data)
