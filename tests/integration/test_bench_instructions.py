"""``python -m benchmarks.instructions`` counts what its rows drive: each HTTP
row's requests must reach a real inbound and be answered as that row says,
or the count measures refusals. Run here without callgrind (a count takes
minutes); the driving code is the row's own."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks import instructions as ins
from benchmarks.fixtures import Identities, make_identities
from benchmarks.harness import free_port


@pytest.fixture(scope="module")
def target() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), ins._Target)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    return make_identities(tmp_path_factory.mktemp("pki"))


def _drive(
    root: Path,
    ids: Identities,
    target: int,
    build: Callable[[Path, Identities, int, int], list[str]],
    drive: Callable[..., None],
    n: int,
) -> list[dict[str, object]]:
    port = free_port()
    proc = ins._start(build(root, ids, port, target), [])
    try:
        ins._ready(proc, port)
        drive(ins._client_context(ids), port, n)
    finally:
        ins._stop(proc)
    lines = (root / f"audit-{port}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_mcp_row_sends_tools_calls_that_the_listener_judges_and_allows(
    tmp_path: Path, ids: Identities, target: int
) -> None:
    records = _drive(tmp_path, ids, target, ins._mcp_config, ins._mcp_requests, 3)
    calls = [r for r in records if r["event"] == "mcp.call"]
    assert [(r["decision"], r["tool"]) for r in calls] == [("allow", "read_timesheet")] * 3
    answered = [r for r in records if r["event"] == "http.request"]
    assert [(r["method"], r["status"]) for r in answered] == [("POST", 200)] * 3


def test_the_http_rows_get_their_answers_through_the_inbound(
    tmp_path: Path, ids: Identities, target: int
) -> None:
    records = _drive(tmp_path, ids, target, ins._http_config, ins._requests, 3)
    records += _drive(tmp_path, ids, target, ins._http_config, ins._mib_requests, 2)
    answered = [r for r in records if r["event"] == "http.request"]
    assert [(r["decision"], r["status"]) for r in answered] == [("allow", 200)] * 5
    assert [r["bytes_down"] for r in answered][3:] == [1 << 20] * 2
