"""Per-record cost of the audit sink: ``python -m proxy.audit.bench [DIR]``.

Writes the same ``http.request`` record N times to a file in DIR (default: a
temporary directory) and prints microseconds per record for: emit only with
one write per 64 KiB (what the sink did before barriers), a barrier after
every record (one write each: the keep-alive case), and a barrier per burst
of 8 records (many connections in one scheduler tick).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from proxy.audit.records import AuditRecord
from proxy.audit.settings import AuditSettings
from proxy.audit.sink import AuditSink

N = 20000


def _record() -> AuditRecord:
    return AuditRecord(
        "http.request",
        "inbound",
        "allow",
        "rule_matched",
        listener="hr-api",
        conn_id="1a2b-3c",
        rule="payroll-reads-timesheets",
        peer_id="spiffe://payroll.example/agent/payroll",
        local_id="spiffe://payroll.example/svc/hr",
        peer_addr="127.0.0.1:51234",
        target="127.0.0.1:8080",
        peer_cert_serial="5f2a9c",
        peer_cert_not_after="2026-12-02T00:00:00.000Z",
        extra={
            "request_id": "0f3c",
            "method": "GET",
            "path": "/timesheets/7",
            "status": 200,
            "bytes_up": 0,
            "bytes_down": 512,
            "duration_ms": 1,
            "policy_version": "sha256:ab",
        },
    )


def run(directory: Path, every: int | None) -> float:
    path = directory / f"bench-{every}.jsonl"
    sink = AuditSink.open(AuditSettings(path=str(path)))
    record = _record()
    pending = 0
    start = time.perf_counter()
    for i in range(N):
        sink.emit(record)
        if every is not None and i % every == every - 1:
            sink.commit()
        pending += 1
        if every is None and pending * 700 >= 65536:
            sink.commit()
            pending = 0
    sink.commit()
    elapsed = time.perf_counter() - start
    sink.close()
    path.unlink()
    return elapsed / N * 1e6


def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    for label, every in (
        ("batched (64 KiB writes)", None),
        ("barrier per record", 1),
        ("barrier per 8 records", 8),
    ):
        best = min(run(base, every) for _ in range(3))
        print(f"{label:28s} {best:6.2f} us/record")


if __name__ == "__main__":
    main()
