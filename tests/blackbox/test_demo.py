"""`make demo` runs the demo module; run it as a test so it cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

COLUMNS = 100  # a terminal narrower than the summary's natural width


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.demo"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": str(COLUMNS)},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()

    def call(prefix: str) -> str:
        return next(line for line in lines if line.strip().startswith(prefix))

    assert "-> 200" in call("payroll   GET http://hr-api/timesheets")
    assert "-> 200" in call("payroll   POST http://bank-api/payments")
    assert "-> 403" in call("payroll   DELETE http://hr-api") and "no_matching_rule" in out
    assert "egress_not_allowed" in call("payroll   GET http://exfil.example")
    assert "upstream_refused" in call("marketing GET http://hr-api")
    assert "X-Forwarded-Client-Cert: By=spiffe://payroll.example/svc/hr;Hash=" in out
    assert "URI=spiffe://payroll.example/agent/payroll" in out
    summary = out[out.index("== audit trail") :].splitlines()[1:]
    assert all(len(line) <= COLUMNS for line in summary), summary
    refused = next(i for i, line in enumerate(summary) if "connection.refused" in line)
    assert re.search(r"connection\.refused\s+deny\s+peer_not_allowed", summary[refused])
    assert summary[refused].count("connection.refused") == 1
    # The caller is not cut: the refused peer is named in full under its row.
    assert "spiffe://payroll.example/agent/marketing" in summary[refused + 1]
    # Nothing left running: every sidecar was started by the demo as a child.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "agent-proxy-demo-" not in ps
