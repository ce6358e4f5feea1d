"""``durability = "fsync"`` and ``high_impact``: a high-impact request reaches
its target only after its ``http.decision`` record is on stable storage, and
not at all when the trail cannot take it (503 ``audit_unavailable``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from proxy.audit import AuditSink
from proxy.audit.settings import AuditSettings
from tests.integration.http_support import (
    RecordingBackend,
    Seen,
    client_context,
    read_response,
    start_inbound,
    tls_connect,
)
from tests.pki import Issued, TestCA

PAYROLL = "spiffe://a.org/agent/payroll"
RULES = [
    {
        "name": "payments",
        "peers": [PAYROLL],
        "methods": ["POST"],
        "paths": ["/payments"],
        # A fresh SVID is the step-up: no approval token to mint here.
        "high_impact": {"max_svid_age": "1h"},
    },
    {"name": "reads", "peers": [PAYROLL], "methods": ["GET"], "paths": ["/timesheets/**"]},
]
PAYMENT = b'{"employee":"ada","amount":12000}'


class _Trail:
    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink


class _AtArrival(list[Seen]):
    """What the trail held when each request reached the backend."""

    def __init__(self, sink: AuditSink, path: Path | None) -> None:
        super().__init__()
        self.sink, self.path = sink, path
        self.states: list[tuple[list[dict[str, Any]], int]] = []

    def append(self, seen: Seen) -> None:
        lines = self.path.read_text().splitlines() if self.path is not None else []
        self.states.append(([json.loads(line) for line in lines], self.sink.fsynced_seq))
        super().append(seen)


def _post() -> bytes:
    return (
        f"POST /payments HTTP/1.1\r\nHost: bank\r\nContent-Length: {len(PAYMENT)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + PAYMENT


async def _send(port: int, client: Issued, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await tls_connect(port, client_context(client))
    try:
        await stream.send_all(raw)
        return await read_response(stream, raw.split(b" ", 1)[0])
    finally:
        await stream.aclose()


async def _run(
    ca: TestCA, sink: AuditSink, path: Path | None, requests: list[bytes]
) -> tuple[list[tuple[int, dict[str, str], bytes]], _AtArrival]:
    backend = RecordingBackend()
    backend.seen = arrivals = _AtArrival(sink, path)
    answers = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.flush_forever)
        await backend.start(nursery)
        _, port = await start_inbound(
            nursery,
            issued=ca.issue("spiffe://a.org/svc/bank"),
            cas=(ca,),
            target_port=backend.port,
            rules=RULES,
            audit=_Trail(sink),  # type: ignore[arg-type]
        )
        client = ca.issue(PAYROLL)
        with trio.fail_after(20):
            for raw in requests:
                answers.append(await _send(port, client, raw))
        nursery.cancel_scope.cancel()
    return answers, arrivals


async def test_a_high_impact_request_is_forwarded_after_its_decision_is_fsynced(
    tmp_path: Path, ca_a: TestCA
) -> None:
    path = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(path), durability="fsync", fsync_interval=0.05)
    sink = AuditSink.open(settings)
    answers, arrivals = await _run(ca_a, sink, path, [_post()])
    sink.close()
    assert answers[0][0] == 200
    records, fsynced = arrivals.states[0]
    decisions = [r for r in records if r["event"] == "http.decision"]
    assert len(decisions) == 1, records
    decision = decisions[0]
    assert (decision["decision"], decision["rule"], decision["path"]) == (
        "allow",
        "payments",
        "/payments",
    )
    assert fsynced >= decision["seq"]  # on disk before the payment went on
    assert len(decision["trace_id"]) == 32
    served = [json.loads(line) for line in path.read_text().splitlines()]
    request = next(r for r in served if r["event"] == "http.request")
    assert request["request_id"] == decision["request_id"]
    assert request["trace_id"] == decision["trace_id"]


async def test_a_high_impact_request_is_refused_when_its_decision_cannot_be_made_durable(
    ca_a: TestCA,
) -> None:
    # on_failure = "open" keeps ordinary traffic flowing on a trail that
    # cannot write; a high-impact action still never goes unrecorded.
    settings = AuditSettings(path="/dev/full", durability="fsync", on_failure="open")
    sink = AuditSink.open(settings)
    read = b"GET /timesheets/1 HTTP/1.1\r\nHost: bank\r\nConnection: close\r\n\r\n"
    answers, arrivals = await _run(ca_a, sink, None, [_post(), read])
    refused, served = answers
    assert refused[0] == 503
    assert json.loads(refused[2])["reason"] == "audit_unavailable"
    assert served[0] == 200
    assert [seen.method for seen in arrivals] == ["GET"]  # the payment never left
