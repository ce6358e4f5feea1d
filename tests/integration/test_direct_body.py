"""Large Content-Length answers moved by the reactor (proxy/runtime/direct.py).

Each scenario runs through a real HTTP inbound listener twice: with the
process's reactor attached (the body goes socket to socket) and without it
(the body goes through the parser and the streams in the session's task).
The client must see the same bytes and the audit record must say the same
thing both ways; with the reactor, it must really have moved the body.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from proxy.http.conn import HEAD_RECV_BYTES
from proxy.runtime.reactor import SCRATCH_BYTES, Reactor, open_reactor
from tests.integration.http_support import client_context, start_inbound
from tests.integration.reactor_support import reset, tcp_pair, tls_pair
from tests.integration.tls_support import MemoryAudit
from tests.pki import Issued, TestCA

CLIENT_ID = "spiffe://a.org/agent/payroll"
BODY = os.urandom(3 << 20)
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n"
REQUEST = b"GET /big HTTP/1.1\r\nhost: hr\r\n\r\n"

Script = Callable[[trio.SocketStream, int], Awaitable[bool]]  # (stream, request no.) -> go on


async def _read_head(stream: trio.SocketStream, buf: bytearray) -> bool:
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return False
        buf += data
    del buf[: buf.index(b"\r\n\r\n") + 4]
    return True


async def _origin(nursery: trio.Nursery, script: Script) -> int:
    async def handle(stream: trio.SocketStream) -> None:
        buf, n = bytearray(), 0
        try:
            while await _read_head(stream, buf):
                n += 1
                if not await script(stream, n):
                    return
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return int(listeners[0].socket.getsockname()[1])


def sizes(*bodies: int) -> Script:
    """Answer request i with a body of ``bodies[i]`` bytes, keep-alive."""

    async def script(stream: trio.SocketStream, n: int) -> bool:
        size = bodies[(n - 1) % len(bodies)]
        await stream.send_all(HEAD % size + BODY[:size])
        return True

    return script


def cut(after: int, how: str) -> Script:
    """Promise all of BODY, send ``after`` bytes, then end (FIN), reset or stall."""

    async def script(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(HEAD % len(BODY) + BODY[:after])
        if how == "reset":
            reset(stream.socket)
        elif how == "stall":
            await trio.sleep_forever()
        return False

    return script


class Client:
    """A TLS client of the inbound listener, reading raw bytes."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def answer(self) -> tuple[bytes, bytes]:
        """(head, body) of one answer; the body as far as it came."""
        while b"\r\n\r\n" not in self.buf:
            if not await self._more():
                return bytes(self.buf), b""
        end = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:end])
        del self.buf[:end]
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(self.buf) < length and await self._more():
            pass
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return head, body

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(1 << 20)
        except (trio.BrokenResourceError, ssl.SSLError):
            data = b""
        self.buf += data
        return bool(data)


async def _scenario(
    hr: Issued,
    ca: TestCA,
    payroll: Issued,
    script: Script,
    *,
    use_reactor: bool,
    client_does: Callable[[Client], Awaitable[Any]],
    stats: dict[str, int] | None = None,
    **extra: Any,
) -> tuple[Any, list[dict[str, Any]], int]:
    """(what the client saw, the http.request records, transfers made);
    ``stats`` gets the reactor's at the end."""
    audit = MemoryAudit()
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        port = await _origin(nursery, script)
        listener, listen = await start_inbound(
            nursery,
            issued=hr,
            cas=(ca,),
            target_port=port,
            rules=[{"peers": [CLIENT_ID], "methods": ["GET"], "paths": ["/**"]}],
            audit=audit,
            **extra,
        )
        listener.reactor = reactor if use_reactor else None
        raw = await trio.open_tcp_stream("127.0.0.1", listen)
        stream = trio.SSLStream(raw, client_context(payroll), server_hostname="hr")
        await stream.do_handshake()
        seen = await client_does(Client(stream))
        with trio.fail_after(60):  # the record of the last request is written
            while len(_requests(audit)) < getattr(seen, "expect", 1):
                await trio.sleep(0.01)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()
        nursery.cancel_scope.cancel()
    if stats is not None:
        stats.update(reactor.stats())
    return seen, _requests(audit), reactor.transfers


def _framing(head: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n") if not line.startswith(b"x-request-id")]


def _requests(audit: MemoryAudit) -> list[dict[str, Any]]:
    return [r for r in audit.records() if r["event"] == "http.request"]


def _verdict(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(k) for k in ("decision", "reason", "status", "outcome", "error"))


class Answers(list[tuple[bytes, bytes]]):
    expect = 3


async def three_in_a_row(client: Client) -> Answers:
    got = Answers()
    for _ in range(3):
        await client.stream.send_all(REQUEST)
        got.append(await client.answer())
    return got


async def test_large_answers_go_socket_to_socket_and_keep_alive_goes_on(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    """Big, small, big on one connection: byte-exact, framed the same, and
    the connection (both sides: the parser skipped the moved bytes, the
    writer counted them) carries the next exchange."""
    script = sizes(len(BODY), 100, (2 << 20) + 1)
    runs, stats = {}, {}
    for use in (True, False):
        runs[use] = await _scenario(
            hr,
            ca_a,
            payroll,
            script,
            use_reactor=use,
            client_does=three_in_a_row,
            stats=stats if use else None,
        )
    (with_r, records, transfers), (without, plain_records, none) = runs[True], runs[False]
    assert [body for _, body in with_r] == [BODY, BODY[:100], BODY[: (2 << 20) + 1]]
    assert [_framing(head) for head, _ in with_r] == [_framing(head) for head, _ in without]
    assert [body for _, body in without] == [body for _, body in with_r]
    assert (transfers, none) == (2, 0)  # the 100-byte answer went the usual way
    # Each big body went around the relay but for what the read that began
    # its answer took (at most HEAD_RECV_BYTES) and its last byte.
    assert stats["transferred_bytes"] >= len(BODY) + (2 << 20) + 1 - 2 * (HEAD_RECV_BYTES + 1)
    assert [r["bytes_down"] for r in records] == [len(BODY), 100, (2 << 20) + 1]
    assert [_verdict(r) for r in records] == [_verdict(r) for r in plain_records]
    assert all(r["decision"] == "allow" and r["status"] == 200 for r in records)


async def read_one(client: Client) -> tuple[bytes, bytes]:
    await client.stream.send_all(REQUEST)
    return await client.answer()


@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_an_upstream_that_ends_mid_body_is_reported_as_before(
    ca_a: TestCA, hr: Issued, payroll: Issued, how: str
) -> None:
    """The reactor stops where the upstream stopped; the session finds the
    end itself and says what it said without the reactor."""
    after = (1 << 20) + 12345
    seen = {
        use: await _scenario(
            hr, ca_a, payroll, cut(after, how), use_reactor=use, client_does=read_one
        )
        for use in (True, False)
    }
    (_, body), records, transfers = seen[True]
    assert transfers == 1 and seen[False][2] == 0
    if how == "eof":
        assert body == BODY[:after] == seen[False][0][1]  # all that came, and no more
    else:  # a reset may discard what the kernel had not yet delivered
        assert BODY[:after].startswith(body) and BODY[:after].startswith(seen[False][0][1])
    assert [_verdict(r) for r in records] == [_verdict(r) for r in seen[False][1]]
    expected = "bad_upstream_response" if how == "eof" else "upstream_reset"
    assert (records[0]["reason"], records[0]["outcome"]) == (expected, "upstream_error")
    assert records[0]["bytes_down"] == len(body)  # counted as sent, all of it received


def _on_mock_time_both_ways(run: Any, *args: Any) -> dict[bool, Any]:
    """``run(*args, use_reactor)`` with the reactor and without, each in its
    own trio run on a MockClock: the timeouts pass in virtual time."""
    results = {}
    for use in (True, False):
        clock = trio.testing.MockClock(autojump_threshold=0.1)
        results[use] = trio.run(run, *args, use, clock=clock, strict_exception_groups=True)
    return results


def test_an_upstream_that_stalls_mid_body_times_out_as_before(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    results = _on_mock_time_both_ways(_stall_run, hr, ca_a, payroll)
    (body, records, transfers), (plain_body, plain_records, _) = results[True], results[False]
    assert transfers == 1
    assert body == BODY[: 1 << 20] == plain_body
    assert [_verdict(r) for r in records] == [_verdict(r) for r in plain_records]
    assert records[0]["reason"] == "upstream_timeout"


async def _stall_run(hr: Issued, ca: TestCA, payroll: Issued, use: bool) -> Any:
    (_, body), records, transfers = await _scenario(
        hr,
        ca,
        payroll,
        cut(1 << 20, "stall"),
        use_reactor=use,
        client_does=read_one,
        response_timeout="30s",
    )
    return body, records, transfers


def test_a_client_that_stops_reading_hits_the_write_timeout_as_before(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    results = _on_mock_time_both_ways(_deaf_run, hr, ca_a, payroll)
    (records, transfers), (plain_records, _) = results[True], results[False]
    assert transfers == 1
    assert [_verdict(r) for r in records] == [_verdict(r) for r in plain_records]
    assert records[0]["reason"] == "write_timeout"


async def _deaf_run(hr: Issued, ca: TestCA, payroll: Issued, use: bool) -> Any:
    async def send_only(client: Client) -> None:
        await client.stream.send_all(REQUEST)  # and never read the answer
        await trio.sleep(25)  # virtual: past the write timeout

    big = sizes(16 << 20)  # far more than the kernel buffers of two sockets
    _, records, transfers = await _scenario(
        hr, ca, payroll, big, use_reactor=use, client_does=send_only, write_timeout="20s"
    )
    return records, transfers


async def test_a_client_that_resets_mid_body_is_reported_as_before(
    ca_a: TestCA, hr: Issued, payroll: Issued
) -> None:
    async def read_some_then_reset(client: Client) -> None:
        await client.stream.send_all(REQUEST)
        while len(client.buf) < (1 << 20):
            assert await client._more()
        reset(client.stream.transport_stream.socket)

    seen = {
        use: await _scenario(
            hr,
            ca_a,
            payroll,
            sizes(16 << 20),
            use_reactor=use,
            client_does=read_some_then_reset,
        )
        for use in (True, False)
    }
    assert seen[True][2] == 1
    # The words of the error are OpenSSL's or pyOpenSSL's: what happened is the same.
    with_r, without = seen[True][1][0], seen[False][1][0]
    assert _verdict(with_r)[:-1] == _verdict(without)[:-1]
    assert with_r["reason"] == "client_reset" and "reset" in with_r["error"].lower()
    assert "reset" in without["error"].lower()


# -- the reactor's transfer itself -------------------------------------------


@pytest.mark.parametrize("kind", ["plain-plain", "tls-tls", "plain-tls", "tls-plain"])
async def test_a_transfer_moves_exactly_its_count_and_ends_neither_side(kind: str) -> None:
    """What follows the count stays unread on the source (the next message),
    and both sides stay open for the next exchange."""
    first, second = kind.split("-")
    target, src = await (tls_pair() if first == "tls" else tcp_pair())
    dst, client = await (tls_pair() if second == "tls" else tcp_pair())
    data = os.urandom(SCRATCH_BYTES * 2 + 777)
    async with open_reactor() as reactor, trio.open_nursery() as nursery:
        nursery.start_soon(target.send_all, data + b"NEXT")
        got = bytearray()

        async def read() -> None:
            while len(got) < len(data):
                got.extend(await client.receive_some(1 << 20))

        nursery.start_soon(read)
        with trio.fail_after(60):
            result = await _transfer(reactor, src, dst, len(data))
    assert (result.reason, result.bytes_up, bytes(got)) == ("closed", len(data), data)
    assert await _receive(src) == b"NEXT"  # not read by the reactor
    await dst.send_all(b"still open")
    assert await client.receive_some(100) == b"still open"


async def _transfer(reactor: Reactor, src: Any, dst: Any, n: int) -> Any:
    return await reactor.transfer(src, dst, n)


async def _receive(end: Any) -> bytes:
    with trio.fail_after(10):
        return bytes(await end.receive_some(100))
