"""Black-box: ``/metrics`` shows the process's epoll reactor: the pairs it
moves now, the bytes it holds for blocked destinations, and the HTTP
bodies it moved (``agent_proxy_reactor_*``)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from tests.blackbox.test_l4_rotation import _http_get, l4_pair
from tests.pki import TestCA
from tests.support import DEADLINE


def _value(metrics: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", metrics, re.M)
    assert found is not None, f"{name} missing from /metrics"
    return float(found.group(1))


def test_the_reactor_pairs_follow_a_live_connection(
    tmp_path: Path, ca_a: TestCA, echo: tuple[str, int]
) -> None:
    with l4_pair(tmp_path, ca_a, echo) as pair:
        before = _http_get(pair.admin, "/metrics")[1]
        assert _value(before, "agent_proxy_reactor_pairs") == 0
        assert _value(before, "agent_proxy_reactor_buffered_bytes") == 0
        assert _value(before, "agent_proxy_reactor_body_transfers_total") == 0
        assert _value(before, "agent_proxy_reactor_body_bytes_total") == 0

        with socket.create_connection(("127.0.0.1", pair.out_port), timeout=DEADLINE) as conn:
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"  # through both relays: the pair is established
            during = _http_get(pair.admin, "/metrics")[1]
            assert _value(during, "agent_proxy_reactor_pairs") == 1
        pair.hr.audit.wait_json(event="connection.close")
        after = _http_get(pair.admin, "/metrics")[1]
        assert _value(after, "agent_proxy_reactor_pairs") == 0
