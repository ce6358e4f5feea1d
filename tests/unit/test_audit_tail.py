"""``agent-proxy audit tail``: filters, a table for people, JSON lines,
colour only on a terminal, following the file across rotation."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

from proxy.audit import AuditRecord, AuditSettings, AuditSink
from proxy.audit.tail import HEADER, render, row
from proxy.cli import main
from tests.audit_support import request
from tests.support import LineReader, agent_proxy_cmd


def trail(path: Path) -> None:
    sink = AuditSink.open(str(path))
    sink.emit(request(1))
    sink.emit(request(2, "deny"))
    sink.emit(
        AuditRecord(
            "connection.refused",
            "inbound",
            "deny",
            "untrusted_chain",
            listener="hr-api",
            peer_id="spiffe://evil.example/x",
            extra={"error": "bad chain"},
        )
    )
    old = AuditRecord(
        "connection.open",
        "inbound",
        "allow",
        "peer_allowed",
        listener="hr-api",
        ts=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
    )
    sink.emit(old)
    sink.close()


def tail(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    capsys.readouterr()
    assert main(["audit", "tail", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_json_lines_with_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    trail(path)
    out = [json.loads(line) for line in tail(capsys, str(path), "--json", "--decision", "deny")]
    assert [r["event"] for r in out] == ["http.request", "connection.refused"]
    out = [
        json.loads(line) for line in tail(capsys, str(path), "--json", "--event", "connection.*")
    ]
    assert [r["event"] for r in out] == ["connection.refused", "connection.open"]
    out = [
        json.loads(line)
        for line in tail(capsys, str(path), "--json", "--peer", "spiffe://evil.example/*")
    ]
    assert [r["reason"] for r in out] == ["untrusted_chain"]
    out = [json.loads(line) for line in tail(capsys, str(path), "--json", "--since", "1h")]
    assert "connection.open" not in [r["event"] for r in out] and len(out) == 3


def test_table_without_colour_when_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    trail(path)
    lines = tail(capsys, str(path))
    assert lines[0].split() == list(HEADER)
    assert "\x1b[" not in "\n".join(lines)
    assert "GET /timesheets/1" in lines[1] and "allow" in lines[1] and "200" in lines[1]
    assert "refused" in lines[3] and "evil.example/x" in lines[3] and "untrusted_chain" in lines[3]


def test_colour_marks_decisions() -> None:
    allow = render(row({"event": "http.request", "decision": "allow"}), colour=True)
    deny = render(row({"event": "http.request", "decision": "deny"}), colour=True)
    assert "\x1b[32mallow" in allow and "\x1b[31mdeny" in deny


def test_bad_since_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    trail(path)
    assert main(["audit", "tail", str(path), "--since", "soon"]) == 2


def test_follow_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = AuditSink.open(AuditSettings(path=str(path), max_bytes=1200))
    sink.emit(request(0))
    sink.commit()
    proc = subprocess.Popen(
        [*agent_proxy_cmd(), "audit", "tail", str(path), "--follow", "--json", "--event", "http.*"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = LineReader(proc.stdout)
        assert json.loads(out.wait_for(lambda line: True))["path"] == "/timesheets/0"
        for i in range(1, 12):  # several rotations
            sink.emit(request(i))
            sink.commit()
        sink.close()
        assert len(list(tmp_path.glob("audit.jsonl.*"))) >= 2
        for _ in range(11):
            out.wait_for(lambda line: True)
        seen = [json.loads(line)["path"] for line in out.all_lines()]
        assert seen == [f"/timesheets/{i}" for i in range(12)]
    finally:
        proc.kill()
        proc.wait()
