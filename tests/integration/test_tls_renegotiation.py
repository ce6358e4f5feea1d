"""A TLS 1.2 client asking to renegotiate is refused at once (issue 12,
item 25): OpenSSL's no_renegotiation alert reaches it and the connection
closes promptly instead of stalling.

The listener is opted down to TLS 1.2; the client is pyOpenSSL without
OP_NO_RENEGOTIATION, calling renegotiate() on an established connection.
"""

from __future__ import annotations

import socket
import struct

import trio
from OpenSSL import SSL

from tests.integration.tls_support import MemoryAudit, start_echo, start_listener
from tests.pki import Issued, TestCA


def _tls12_client(issued: Issued, port: int, deadline: float) -> tuple[bytes, str]:
    """Blocking client (run in a thread): echo once, then renegotiate.
    Returns the echo and what ended the renegotiation."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate(issued.cert)
    ctx.use_privatekey(issued.key)
    sock = socket.create_connection(("127.0.0.1", port))
    # A blocking socket whose reads give up at the deadline: OpenSSL then
    # reports "want read", which here means the server left us hanging.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(deadline), 0))
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    try:
        conn.do_handshake()
        assert conn.get_protocol_version_name() == "TLSv1.2"
        conn.sendall(b"hello")
        echoed = conn.recv(100)
        assert conn.renegotiate()
        try:
            conn.do_handshake()
            while conn.recv(100):
                pass
            outcome = "closed"
        except SSL.ZeroReturnError:
            outcome = "closed"
        except SSL.WantReadError:
            outcome = "stalled"
        except SSL.Error as exc:
            outcome = str(exc)
        return echoed, outcome
    finally:
        sock.close()


async def test_tls12_renegotiation_is_refused_and_the_connection_closes(ca_a: TestCA) -> None:
    hr = ca_a.issue("spiffe://a.org/svc/hr")
    payroll = ca_a.issue("spiffe://a.org/agent/payroll")
    audit = MemoryAudit()
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        _, port = await start_listener(
            nursery,
            nursery,
            direction="inbound",
            issued=hr,
            cas=(ca_a,),
            patterns=["spiffe://a.org/agent/payroll"],
            target=("127.0.0.1", echo_port),
            audit=audit,
            min_tls="1.2",
        )
        echoed, outcome = await trio.to_thread.run_sync(_tls12_client, payroll, port, 10.0)
        with trio.fail_after(10):
            while not any(r["event"] == "connection.close" for r in audit.records()):
                await trio.sleep(0)  # yield to the handler task; no wall-clock wait
        nursery.cancel_scope.cancel()
    assert echoed == b"hello"
    assert outcome != "stalled"
    assert "no renegotiation" in outcome.lower()
    closed = next(r for r in audit.records() if r["event"] == "connection.close")
    assert closed["peer_id"] == "spiffe://a.org/agent/payroll"
