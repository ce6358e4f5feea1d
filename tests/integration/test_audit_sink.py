"""The audit sink on real files: barriers, per-tick coalescing, a full
filesystem (fail closed / fail open), recovery, no spliced records, a
deleted directory, fsync group commit, metrics."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from proxy.audit import AuditSettings, AuditSink
from proxy.audit.exposition import register
from proxy.audit.files import trail_files
from proxy.audit.verify import read_lines, verify
from proxy.metrics import Metrics
from tests.audit_support import bundles, request, signer_of
from tests.pki import TestCA


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real filesystem that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs (root needed): {done.stderr!r}")
        pytest.skip("cannot mount a tmpfs (root needed)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 1024)
    finally:
        os.close(fd)
    return filler


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def intact(path: Path) -> None:
    """Every line is a whole record and the chain has no hole."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and b"\n\n" not in raw
    seqs = [r["seq"] for r in records(path)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    report = verify(read_lines(list(trail_files([str(path)]))), bundles())
    assert "unsealed" in report.message or report.ok, report.message  # chain intact


def test_commit_writes_before_returning(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = AuditSink.open(str(path))
    sink.emit(request(1))
    assert path.read_bytes() == b""  # emit costs no syscall
    sink.commit()
    assert [r["path"] for r in records(path)] == ["/timesheets/1"]
    sink.close()


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_records_of_one_tick_go_out_in_one_write() -> None:
    stream = CountingStream()
    sink = AuditSink(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.flush_forever)
        await trio.testing.wait_all_tasks_blocked()

        async def decide(i: int) -> None:
            sink.emit(request(i))

        for i in range(20):
            nursery.start_soon(decide, i)
        await trio.testing.wait_all_tasks_blocked()
        # No barrier was called: the end-of-tick flush wrote all 20 at once.
        assert stream.getvalue().count("\n") == 20
        assert stream.writes == 1
        sink.commit()  # nothing pending: no write
        assert stream.writes == 1
        nursery.cancel_scope.cancel()


def test_dev_full_fails_closed_and_counts_once(tmp_path: Path) -> None:
    sink = AuditSink.open(AuditSettings(path="/dev/full"))
    metrics = Metrics()
    register(metrics.registry, sink)
    with structlog.testing.capture_logs() as logs:
        sink.emit(request(1))
        sink.commit()
        assert not sink.healthy and not sink.accepting()
        for i in range(5):  # barriers while failing do not hammer the device
            sink.emit(request(i))
            sink.commit()
        sink.flush(retry=True)  # the background retry
    assert sink.errors == 2
    assert sink.dropped == 0  # closed mode: kept, not dropped
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["error"] == "No space left on device"
    body = metrics.render().decode()
    assert "agent_proxy_audit_errors_total 2.0" in body
    assert "agent_proxy_audit_healthy 0.0" in body


def test_dev_full_fails_open_and_counts_drops() -> None:
    sink = AuditSink.open(AuditSettings(path="/dev/full", on_failure="open"))
    sink.emit(request(1))
    sink.commit()
    assert not sink.healthy and sink.accepting()
    for i in range(4):
        sink.emit(request(i))
    assert sink.dropped == 5


def test_full_filesystem_closed_keeps_every_record_and_recovers(small_fs: Path) -> None:
    path = small_fs / "audit.jsonl"
    sink = AuditSink.open(str(path))
    sink.emit(request(0))
    sink.commit()
    filler = fill(small_fs)
    for i in range(1, 40):
        sink.emit(request(i))
        sink.commit()
    assert not sink.healthy and not sink.accepting()
    filler.unlink()
    sink.flush(retry=True)
    assert sink.healthy and sink.accepting()
    assert [r["path"] for r in records(path)] == [f"/timesheets/{i}" for i in range(40)]
    intact(path)
    sink.close()


def test_half_written_record_is_finished_not_spliced(small_fs: Path) -> None:
    path = small_fs / "audit.jsonl"
    sink = AuditSink.open(str(path))
    sink.emit(request(0))
    sink.commit()
    # The file's first page has room for a dozen more records; no page is
    # left after it, so the record that crosses into it is written in part.
    filler = fill(small_fs)
    for i in range(1, 30):
        sink.emit(request(i))
        sink.commit()
    assert not sink.healthy
    partial = path.read_bytes()
    assert partial and not partial.endswith(b"\n")  # a record was cut mid-line
    filler.unlink()
    sink.flush(retry=True)
    assert len(records(path)) == 30
    intact(path)


def test_full_filesystem_open_drops_counts_and_marks_the_gap(small_fs: Path) -> None:
    path = small_fs / "audit.jsonl"
    sink = AuditSink.open(AuditSettings(path=str(path), on_failure="open"))
    sink.emit(request(0))
    sink.commit()
    filler = fill(small_fs)
    for i in range(1, 20):
        sink.emit(request(i))
        sink.commit()
    assert sink.accepting() and sink.dropped > 0
    filler.unlink()
    sink.flush(retry=True)
    sink.emit(request(99))
    sink.commit()
    written = records(path)
    gaps = [r for r in written if r["event"] == "audit.gap"]
    assert len(gaps) == 1 and gaps[0]["dropped"] == sink.dropped
    assert written[-1]["path"] == "/timesheets/99"
    intact(path)  # dropped records leave no hole in the chain


async def test_background_retry_recovers_by_itself(
    small_fs: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = small_fs / "audit.jsonl"
    sink = AuditSink.open(str(path))
    filler = fill(small_fs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.flush_forever)
        sink.emit(request(1))
        sink.commit()
        assert not sink.healthy
        filler.unlink()
        with trio.fail_after(10):
            while not sink.healthy:
                await trio.sleep(0.1)  # virtual time: the retry runs every second
        nursery.cancel_scope.cancel()
    assert [r["path"] for r in records(path)] == ["/timesheets/1"]


async def test_deleted_directory_fails_closed_then_recovers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    path = directory / "audit.jsonl"
    sink = AuditSink.open(str(path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.flush_forever)
        sink.emit(request(1))
        sink.commit()
        shutil.rmtree(directory)
        with trio.fail_after(10):
            while sink.healthy:
                await trio.sleep(0.1)
        assert not sink.accepting()
        sink.emit(request(2))  # queued, not lost
        directory.mkdir()
        with trio.fail_after(10):
            while not sink.healthy:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert [r["path"] for r in records(path)] == ["/timesheets/2"]


async def test_fsync_durability_group_commits(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = AuditSink.open(AuditSettings(path=str(path), durability="fsync", fsync_interval=0.01))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.flush_forever)
        for i in range(3):
            sink.emit(request(i))
        with trio.fail_after(10):
            assert await sink.durable()
        assert sink._synced_seq >= 3
        nursery.cancel_scope.cancel()


async def test_checkpoints_every_interval(
    tmp_path: Path, ca_a: TestCA, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "audit.jsonl"
    svid = ca_a.issue("spiffe://a.org/sidecar")
    settings = AuditSettings(path=str(path), checkpoint_interval=10.0)
    sink = AuditSink.open(settings, signer=signer_of([svid]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.flush_forever)
        sink.emit(request(1))
        sink.commit()
        await trio.sleep(9.9)
        assert [r["event"] for r in records(path)] == ["http.request"]
        await trio.sleep(0.2)
        assert [r["event"] for r in records(path)] == ["http.request", "audit.checkpoint"]
        await trio.sleep(30)  # nothing new: no empty checkpoints
        assert len(records(path)) == 2
        nursery.cancel_scope.cancel()


def test_rotation_by_age_and_pruning_keeps_the_chain(tmp_path: Path, ca_a: TestCA) -> None:
    import datetime as dt

    svid = ca_a.issue("spiffe://a.org/sidecar")
    now = [dt.datetime.now(dt.UTC)]
    path = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(path), max_age=60.0, keep=2)
    sink = AuditSink.open(settings, signer=signer_of([svid]), clock=lambda: now[0])
    for i in range(5):
        sink.emit(request(i))
        sink.commit()
        now[0] += dt.timedelta(seconds=61)  # every file is older than max_age by the next write
    sink.close()
    rotated = sorted(p for p in tmp_path.iterdir() if p.name != "audit.jsonl")
    assert len(rotated) == 2  # keep = 2: the oldest were pruned
    for file in rotated:
        assert records(file)[-1]["event"] == "audit.checkpoint"  # each sealed at rotation
    report = verify(read_lines(list(trail_files([str(tmp_path)]))), bundles(ca_a))
    assert report.ok, report.message
    assert any("earlier files rotated away" in note for note in report.notes)


async def test_durable_is_false_while_failing() -> None:
    sink = AuditSink.open(AuditSettings(path="/dev/full", durability="fsync"))
    sink.emit(request(1))
    assert await sink.durable() is False
