"""`make demo` runs the demo module; run it as a test so it cannot rot."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run([sys.executable, "-m", "proxy.demo"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '200 {"timesheets"' in out
    assert "peer_not_allowed" in out
    assert "spiffe://payroll.example/agent/marketing" in out
