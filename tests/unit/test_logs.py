"""Operational logs follow the process's current stderr."""

from __future__ import annotations

import io
import sys

import pytest
import structlog

from proxy import logs


def test_logs_follow_the_current_stderr_and_survive_a_closed_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by the full suite: a logger bound to the stderr of the moment kept
    # writing to it after it was replaced and closed, and every log call then
    # raised "I/O operation on closed file" (in a sidecar: every connection).
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.select_format("json")
    logs.configure("info")
    try:
        log = structlog.get_logger("agent_proxy.test")
        log.info("one")
        assert '"one"' in first.getvalue()
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        log.info("two")
        assert '"two"' in second.getvalue()
        second.close()
        log.info("three")  # a closed stderr drops the line; it never raises
    finally:
        logs.select_format(None)
