"""Audit trails for tests: a real sink writing real files, signed by a test SVID."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from proxy.audit import AuditRecord, AuditSettings, AuditSink
from proxy.identity import TrustBundle, TrustBundleSet, TrustDomain
from tests.pki import Issued, TestCA


def signer_of(holder: list[Issued]) -> Callable[[], tuple[object, list[object]]]:
    """Follows rotation: signs with whatever ``holder[0]`` is at the time."""
    return lambda: (holder[0].key, [holder[0].cert, *holder[0].chain])


def bundles(*cas: TestCA) -> TrustBundleSet:
    return TrustBundleSet(
        [TrustBundle.from_pem(TrustDomain.parse(ca.trust_domain), ca.bundle_pem()) for ca in cas]
    )


def request(i: int, decision: str = "allow") -> AuditRecord:
    return AuditRecord(
        "http.request",
        "inbound",
        "allow" if decision == "allow" else "deny",
        "rule_matched",
        listener="hr-api",
        conn_id="c1",
        peer_id="spiffe://a.example/agent/payroll",
        local_id="spiffe://a.example/sidecar",
        extra={"method": "GET", "path": f"/timesheets/{i}", "status": 200},
    )


def write_trail(
    path: Path,
    svid: Issued,
    count: int = 10,
    *,
    settings: AuditSettings | None = None,
    clock: Callable[[], dt.datetime] | None = None,
) -> None:
    """``count`` request records then a closing checkpoint, in one file."""
    sink = AuditSink.open(
        settings or AuditSettings(path=str(path)),
        signer=signer_of([svid]),
        clock=clock or (lambda: dt.datetime.now(dt.UTC)),
    )
    for i in range(count):
        sink.emit(request(i))
        sink.commit()
    sink.close()
