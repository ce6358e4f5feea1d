"""L4 pairs move on the epoll reactor: registered while the connection
lives, unregistered when trio cancels its task (here: its lifetime)."""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from proxy.identity import IdentityState
from proxy.netaddr import HostPort
from proxy.policy import parse_patterns
from proxy.runtime.l4 import L4Config, L4Listener
from tests.integration.http_support import client_context, tls_connect
from tests.integration.tls_support import MemoryAudit, snapshot, start_echo
from tests.pki import Issued, TestCA


async def test_a_tcp_pair_is_on_the_reactor_until_its_lifetime_cancels_it(
    ca_a: TestCA, hr: Issued, autojump_clock: trio.testing.MockClock
) -> None:
    audit = MemoryAudit()
    payroll = client_context(ca_a.issue("spiffe://a.org/agent/payroll"))
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        config = L4Config(
            "tcp-in",
            "inbound",
            HostPort("127.0.0.1", 0),
            HostPort("127.0.0.1", echo),
            parse_patterns(["spiffe://a.org/**"]),
            max_connection_lifetime=300.0,
        )
        listener = L4Listener(config, IdentityState(snapshot(hr, ca_a)), audit.sink)
        bound = await nursery.start(listener.serve, nursery)
        stream = await tls_connect(int(bound[0].rpartition(":")[2]), payroll)
        await stream.send_all(b"ping")
        assert await stream.receive_some(10) == b"ping"
        assert listener.reactor is not None
        assert listener.reactor.stats()["pairs"] == 1
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(10):
                pass  # until the lifetime ends the connection
        assert listener.reactor.stats() == {
            "pairs": 0,
            "sockets": 0,
            "buffered_bytes": 0,
            "transfers": 0,
            "transferred_bytes": 0,
        }
        nursery.cancel_scope.cancel()
    closed = [r for r in audit.records() if r["event"] == "connection.close"]
    assert [(r["reason"], r["bytes_up"], r["bytes_down"]) for r in closed] == [
        ("max_lifetime", 4, 4)
    ]
