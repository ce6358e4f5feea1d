"""TLSStream over real loopback sockets with real handshakes."""

from __future__ import annotations

import os
import select
import ssl

import pytest
import trio
import trio.testing

from proxy.tls import TLSHandshakeError, TLSStream
from tests.integration.tls_support import side
from tests.pki import TestCA


async def _pair(nursery: trio.Nursery, server_side, client_side):  # type: ignore[no-untyped-def]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_raw = await trio.open_tcp_stream("127.0.0.1", port)
    server_raw = await listeners[0].accept()
    await listeners[0].aclose()
    return TLSStream(server_raw, server_side), TLSStream(client_raw, client_side)


async def _handshake_both(server: TLSStream, client: TLSStream) -> dict[str, BaseException]:
    errors: dict[str, BaseException] = {}

    async def run(name: str, stream: TLSStream) -> None:
        try:
            await stream.do_handshake()
            if name == "client":
                # TLS 1.3: the server judges the client certificate after the
                # client's handshake completes; a refusal arrives as an alert.
                await stream.send_all(b"ping")
                data = await stream.receive_some()
                if not data:
                    raise trio.BrokenResourceError("closed")
            else:
                data = await stream.receive_some()
                await stream.send_all(data)
        except trio.BrokenResourceError as exc:
            errors[name] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "server", server)
            nursery.start_soon(run, "client", client)
    return errors


@pytest.fixture
def ids(ca_a: TestCA) -> dict[str, object]:
    return {
        "server": ca_a.issue("spiffe://a.org/svc/hr"),
        "client": ca_a.issue("spiffe://a.org/agent/payroll"),
    }


async def test_handshake_and_bidirectional_data(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/agent/*"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/svc/hr"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        errors = await _handshake_both(server, client)
        assert errors == {}
        assert server.peer.verified is not None
        assert str(server.peer.verified.spiffe_id) == "spiffe://a.org/agent/payroll"
        assert str(client.peer.verified.spiffe_id) == "spiffe://a.org/svc/hr"  # type: ignore[union-attr]
        assert server.peer.decision.rule == "spiffe://a.org/agent/*"  # type: ignore[union-attr]

        # Half-close: the client's close_notify reads as EOF, the server can still send.
        await client.send_eof()
        assert await server.receive_some() == b""
        payload = b"x" * 300_000
        async with trio.open_nursery() as inner:
            inner.start_soon(server.send_all, payload)
            got = bytearray()
            while len(got) < len(payload):
                got += await client.receive_some()
        assert bytes(got) == payload
        await server.aclose()
        assert await client.receive_some() == b""
        await client.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")


async def test_send_after_eof_is_closed_resource(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        await client.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"late")
        await client.aclose()
        await server.aclose()


async def test_eof_without_close_notify_reads_as_truncated_eof(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        await client.transport.aclose()  # TCP FIN, no close_notify
        assert await server.receive_some() == b""
        assert server.truncated
        assert await server.receive_some() == b""  # EOF stays EOF
        await server.aclose()


async def test_transport_reset_is_broken_resource(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    import socket
    import struct

    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        # SO_LINGER 0 makes close() send a RST.
        raw = client.transport.socket  # type: ignore[attr-defined]
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.transport.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        await server.aclose()


async def test_peer_not_allowed_fails_inside_handshake(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/agent/marketing"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/svc/hr"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        errors = await _handshake_both(server, client)
        assert isinstance(errors["server"], TLSHandshakeError)
        assert errors["server"].reason == "peer_not_allowed"
        # The client learns through a TLS alert, not a silent close.
        assert "client" in errors
        assert "alert" in repr(errors["client"].__cause__).lower() or isinstance(
            errors["client"], trio.BrokenResourceError
        )


async def test_outbound_refuses_unexpected_upstream(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/svc/bank"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        errors = await _handshake_both(server, client)
        assert isinstance(errors["client"], TLSHandshakeError)
        assert errors["client"].reason == "peer_not_allowed"
        # The server sees the client's alert during its own handshake.
        assert isinstance(errors["server"], TLSHandshakeError)


@pytest.mark.parametrize("direction", ["inbound client", "outbound upstream"])
async def test_cross_trust_domain_forgery_is_refused(
    ca_a: TestCA, ca_b: TestCA, direction: str
) -> None:
    """An SVID for b.org minted by a.org's CA fails even with both bundles loaded."""
    forged = ca_a.issue("spiffe://b.org/agent/payroll")
    honest = ca_a.issue("spiffe://a.org/svc/hr")
    if direction == "inbound client":
        s = side(honest, (ca_a, ca_b), ["spiffe://b.org/**"], server=True)
        c = side(forged, (ca_a, ca_b), ["spiffe://a.org/**"], server=False)
        judge = "server"
    else:
        s = side(forged, (ca_a, ca_b), ["spiffe://a.org/**"], server=True)
        c = side(honest, (ca_a, ca_b), ["spiffe://b.org/agent/payroll"], server=False)
        judge = "client"
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        errors = await _handshake_both(server, client)
    err = errors[judge]
    assert isinstance(err, TLSHandshakeError)
    assert err.reason == "untrusted_chain"
    assert "b.org" in err.message or "chain" in err.message


async def test_tls12_peer_refused_by_default(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False, min_version="1.2")
    # Force the client to offer only TLS 1.2.
    from OpenSSL import SSL

    c.context.set_max_proto_version(SSL.TLS1_2_VERSION)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        errors = await _handshake_both(server, client)
    assert isinstance(errors["server"], TLSHandshakeError)
    assert errors["server"].reason == "tls_version_refused"


async def test_tls12_allowed_when_configured(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True, min_version="1.2")
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False, min_version="1.2")
    from OpenSSL import SSL

    c.context.set_max_proto_version(SSL.TLS1_2_VERSION)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        assert server.ssl_connection.get_protocol_version_name() == "TLSv1.2"
        await client.aclose()
        await server.aclose()


def test_ssl_module_constant_sanity() -> None:
    # Python's ssl is one of our black-box clients; TLS 1.3 must exist here.
    assert ssl.HAS_TLSv1_3


@pytest.mark.parametrize("server", [True, False])
def test_record_buffers_are_released_when_idle(ca_a: TestCA, ids, server: bool) -> None:  # type: ignore[no-untyped-def]
    """Listeners, upstream connections and the pool all build their contexts
    with build_side: an idle connection keeps no OpenSSL record buffers."""
    from OpenSSL import SSL

    issued = ids["server"] if server else ids["client"]
    s = side(issued, (ca_a,), ["spiffe://a.org/**"], server=server)
    assert s.context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS


async def test_reactor_handles_after_the_handshake(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    """A reactor gets the socket's fd and the OpenSSL connection on it, and
    can move bytes itself once the stream's tasks are out of the way."""
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        assert server.fileno == server.transport.socket.fileno()
        assert server.ssl_connection.get_protocol_version_name() == "TLSv1.3"
        client.ssl_connection.send(b"direct")
        await trio.lowlevel.wait_readable(server.fileno)
        assert server.ssl_connection.recv(100) == b"direct"
        await client.aclose()
        await server.aclose()


async def test_concurrent_first_uses_share_one_handshake(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    # The receiver and the sender may both start the handshake: the second
    # waits for the first (the lock) and then finds it done.
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        got: list[bytes] = []

        async def echo() -> None:
            await server.send_all(await server.receive_some())

        async def receive() -> None:
            got.append(await client.receive_some())

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(echo)
                inner.start_soon(receive)
                inner.start_soon(client.send_all, b"ping")
        assert got == [b"ping"]
        await client.aclose()
        await server.aclose()


async def test_a_handshake_waiting_on_a_failed_one_is_broken(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        client.transport.socket.close()  # type: ignore[attr-defined]  # mid-handshake
        errors: list[BaseException] = []

        async def shake() -> None:
            try:
                await server.do_handshake()
            except trio.BrokenResourceError as exc:
                errors.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(shake)
                inner.start_soon(shake)
        assert [type(e) for e in errors] == [TLSHandshakeError, trio.BrokenResourceError]
        assert isinstance(errors[0], TLSHandshakeError)
        assert errors[0].reason == "tls_error"
        await server.aclose()
        await client.aclose()


async def test_close_now_sends_close_notify_and_closes_the_socket(ca_a: TestCA, ids) -> None:  # type: ignore[no-untyped-def]
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/**"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/**"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        server.close_now()
        assert server.transport.socket.fileno() == -1  # type: ignore[attr-defined]
        server.close_now()  # a second close does nothing
        with trio.testing.assert_checkpoints():
            await server.aclose()
        assert await client.receive_some() == b""
        assert not client.truncated  # close_notify, not a bare FIN
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()
        await client.aclose()


async def test_a_receive_after_a_blocked_receive_now_still_sees_what_openssl_holds(
    ca_a: TestCA,
    ids,  # type: ignore[no-untyped-def]
) -> None:
    """receive_now that found nothing lets the next receive_some wait for
    the socket before asking OpenSSL again; bytes OpenSSL decrypted already
    (a record read only in part) never show on the socket, so they must be
    returned without that wait."""
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/agent/*"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/svc/hr"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        assert server.receive_now(100) is None  # nothing yet: OpenSSL wanted the socket
        await client.send_all(b"0123456789")  # one record
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(server.fileno)
            assert server.receive_now(1) == b"0"  # the rest of the record stays in OpenSSL
            assert await server.receive_some(100) == b"123456789"
        await client.aclose()
        await server.aclose()


def _unread(stream: TLSStream) -> int:
    """Bytes the kernel holds for ``stream``'s socket, not yet read by OpenSSL."""
    import fcntl
    import struct
    import termios

    raw = fcntl.ioctl(stream.fileno, termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


async def _wait_unread(stream: TLSStream, at_least: int) -> None:
    with trio.fail_after(10):
        while _unread(stream) < at_least:
            await trio.sleep(0.005)


# TLS 1.3 record overhead with an AEAD suite: 5-byte header, 1-byte inner
# content type, 16-byte tag (RFC 8446 section 5.2; no padding by default).
_RECORD = 16384
_OVERHEAD = 22
_ENDED = select.POLLRDHUP | select.POLLHUP | select.POLLERR


@pytest.mark.parametrize("now", [True, False], ids=["receive_now", "receive_some"])
async def test_one_receive_takes_every_full_record_already_there(
    ca_a: TestCA,
    ids,  # type: ignore[no-untyped-def]
    now: bool,
) -> None:
    """A bulk body arrives as full 16 KiB records: one receive returns all
    of them that are already there (up to max_bytes), so the HTTP relay
    runs once per burst, not once per record (OpenSSL's SSL_read gives one
    record per call)."""
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/agent/*"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/svc/hr"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        payload = os.urandom(3 * _RECORD + 1000)  # three full records and a short one
        await client.send_all(payload)
        await _wait_unread(server, len(payload) + 4 * _OVERHEAD)
        with trio.fail_after(5):
            got = server.receive_now(1 << 20) if now else await server.receive_some(1 << 20)
        assert got == payload
        # max_bytes still bounds one receive, across records too.
        await client.send_all(payload)
        await _wait_unread(server, len(payload) + 4 * _OVERHEAD)
        first = server.receive_now(_RECORD + 10)
        assert first == payload[: _RECORD + 10]
        rest = bytearray()
        with trio.fail_after(5):
            while len(rest) < len(payload) - len(first):  # type: ignore[arg-type]
                rest += await server.receive_some(1 << 20)
        assert first + bytes(rest) == payload  # type: ignore[operator]
        await client.aclose()
        await server.aclose()


@pytest.mark.parametrize("ending", ["close_notify", "fin", "reset"])
async def test_bytes_before_the_end_come_first_and_the_end_next(
    ca_a: TestCA,
    ids,  # type: ignore[no-untyped-def]
    ending: str,
) -> None:
    """When the records already there end in close_notify, a bare FIN or
    a reset, one receive returns the bytes before it and the next receive
    reports the end as it always has: EOF, truncated EOF, broken."""
    import socket
    import struct

    s = side(ids["server"], (ca_a,), ["spiffe://a.org/agent/*"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/svc/hr"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        payload = os.urandom(2 * _RECORD)  # full records: the batch reads on past them
        await client.send_all(payload)
        wire = len(payload) + 2 * _OVERHEAD
        if ending == "close_notify":
            await client.send_eof()
            wire += _OVERHEAD - 1 + 2  # the alert record: header, tag, type, 2-byte alert
        await _wait_unread(server, wire)
        raw = client.transport.socket  # type: ignore[attr-defined]
        if ending == "reset":  # SO_LINGER 0: close() sends a RST
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if ending != "close_notify":
            await client.transport.aclose()
            # The FIN (RDHUP) or the RST (HUP, ERR) has reached our socket.
            poller = select.poll()
            poller.register(server.fileno, select.POLLIN | select.POLLRDHUP)
            with trio.fail_after(5):
                while not any(ev & _ENDED for _, ev in poller.poll(0)):
                    await trio.sleep(0.005)
        if ending == "reset":
            # A RST may discard what was not read yet; whatever came is intact.
            got = bytearray()
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                while data := await server.receive_some(1 << 20):
                    got += data
            assert payload.startswith(bytes(got))
        else:
            with trio.fail_after(5):
                assert await server.receive_some(1 << 20) == payload
                assert await server.receive_some(1 << 20) == b""
            assert server.truncated == (ending == "fin")
            assert await server.receive_some(1 << 20) == b""  # EOF stays EOF
        await server.aclose()


async def test_send_now_takes_what_fits_and_send_all_sends_the_rest_exactly(
    ca_a: TestCA,
    ids,  # type: ignore[no-untyped-def]
) -> None:
    """send_now writes record after record until the socket is full and
    says how much went; the caller's send_all from that offset repeats the
    record OpenSSL holds part of, so the peer reads every byte once, in order."""
    s = side(ids["server"], (ca_a,), ["spiffe://a.org/agent/*"], server=True)
    c = side(ids["client"], (ca_a,), ["spiffe://a.org/svc/hr"], server=False)
    async with trio.open_nursery() as nursery:
        server, client = await _pair(nursery, s, c)
        assert await _handshake_both(server, client) == {}
        payload = os.urandom(32 << 20)  # far more than two socket buffers hold
        sent = client.send_now(payload)
        assert 0 < sent < len(payload)  # the peer reads nothing yet: the socket filled
        got = bytearray()

        async def read_all() -> None:
            while len(got) < len(payload):
                got.extend(await server.receive_some(1 << 20))

        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                inner.start_soon(read_all)
                await client.send_all(memoryview(payload)[sent:])
        assert got == payload
        with pytest.raises(ValueError):
            server.receive_now(0)  # never a b"" that would read as the end
        # A small send into an empty socket goes whole, at once.
        assert client.send_now(b"ping") == 4
        with trio.fail_after(5):
            assert await server.receive_some(100) == b"ping"
        await client.aclose()
        await server.aclose()


def test_each_thread_reads_into_a_buffer_of_its_own() -> None:
    """cffi releases the GIL around SSL_read: a read buffer shared by two
    threads could hand one connection's bytes to another."""
    import threading

    from proxy.tls import raw_io

    views: list[object] = []
    thread = threading.Thread(target=lambda: views.append(raw_io._batch()[0]))
    thread.start()
    thread.join(10)
    here = raw_io._batch()[0]
    assert here is raw_io._batch()[0]  # made once per thread, then reused
    assert views and views[0] is not here
    assert views[0].obj is not here.obj  # type: ignore[attr-defined]
