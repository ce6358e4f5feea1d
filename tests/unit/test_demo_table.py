"""The demo's audit summary fits the terminal: no column cut, no event twice."""

from __future__ import annotations

import pytest

from proxy.demo_table import SUMMARY_HEADS, summary_rows, summary_table

PAYROLL = "spiffe://payroll.example/agent/payroll"
RECORDS = [
    {
        "event": "connection.open",
        "decision": "allow",
        "reason": "peer_allowed",
        "peer_id": PAYROLL,
        "target": "127.0.0.1:8080",
        "rule": PAYROLL,
    },
    {
        "event": "http.request",
        "decision": "allow",
        "reason": "rule_matched",
        "peer_id": PAYROLL,
        "method": "GET",
        "path": "/timesheets/2026-11",
        "rule": "payroll-reads-timesheets",
    },
    {
        "event": "connection.refused",
        "decision": "deny",
        "reason": "peer_not_allowed",
        "peer_id": "spiffe://payroll.example/agent/marketing",
        "target": "127.0.0.1:8080",
        "rule": None,
    },
    {"event": "connection.close", "decision": "allow", "reason": "shutdown", "peer_id": PAYROLL},
]


def test_connection_rows_name_their_target_not_their_event_again() -> None:
    rows = summary_rows("hr", RECORDS)
    assert len(rows) == 3  # connection.close is not a decision
    for row in rows:
        assert row.count(row[1]) == 1
    assert rows[0][5] == "127.0.0.1:8080"
    assert rows[1][5] == "GET /timesheets/2026-11"


@pytest.mark.parametrize("width", [200, 100, 80, 60])
def test_every_line_fits_and_no_caller_is_lost(width: int) -> None:
    rows = summary_rows("hr", RECORDS)
    lines = summary_table(rows, width)
    assert all(len(line) <= width for line in lines), lines
    text = "\n".join(lines)
    for row in rows:
        for cell in row:
            assert cell in text, (cell, lines)


def test_wide_terminal_gets_one_aligned_row_per_record() -> None:
    rows = summary_rows("hr", RECORDS)
    lines = summary_table(rows, 200)
    assert lines[0].split() == list(SUMMARY_HEADS)
    assert len(lines) == 1 + len(rows)
    starts = {line.index(rows[i][4]) for i, line in enumerate(lines[1:])}
    assert len(starts) == 1  # the peer column lines up
