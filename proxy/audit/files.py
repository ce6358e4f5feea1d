"""Where audit lines go: a text stream, or a rotating file; and reading a
trail's files back in order.

A file output is an ``O_APPEND`` descriptor written with ``os.write`` so the
sink knows exactly how many bytes of a batch reached the kernel (a partial
write before ENOSPC must be finished, never spliced). Rotated files are
named ``PATH.<UTC stamp>`` and the trail's order is the order of the first
record's ``seq`` in each file, whatever the names say.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from proxy.audit.chain import GENESIS, link, parse_line

_STAMP = re.compile(r"\.\d{8}T\d{6}\.\d{6}Z$")


class StreamOutput:
    """stdout or any text stream: a write is all or nothing."""

    rotates = False

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.stream.write(bytes(data).decode("utf-8"))
        self.stream.flush()
        return len(data)

    def sync(self) -> None:
        return None

    def stale(self) -> bool:
        return False

    def close(self) -> None:
        import sys

        if self.stream not in (sys.stdout, sys.stderr):
            self.stream.close()


@dataclass
class Resume:
    """Where an existing file leaves the chain."""

    seq: int = 0
    head: str = GENESIS
    partial_tail: bool = False  # the last line has no newline (crash mid-write)
    foreign: bool = False  # lines that are not a chained trail
    started: _dt.datetime | None = None  # the first record's time


class FileOutput:
    rotates = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.size = 0
        self.started = _dt.datetime.now(_dt.UTC)

    def open(self) -> Resume:
        """Open (creating 0600) and read where the chain stands; OSError if not."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.fd = fd
        self.size = os.fstat(fd).st_size
        resume = read_resume(self.path) if self.size else Resume()
        self.started = resume.started or _dt.datetime.now(_dt.UTC)
        return resume

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = os.write(self.fd, data)
        self.size += n
        return n

    def sync(self) -> None:
        os.fsync(self.fd)

    def dup(self) -> int:
        return os.dup(self.fd)

    def stale(self) -> bool:
        """The path no longer names our file (deleted, or its directory gone)."""
        try:
            on_disk = os.stat(self.path)
        except OSError:
            return True
        mine = os.fstat(self.fd)
        return (on_disk.st_ino, on_disk.st_dev) != (mine.st_ino, mine.st_dev)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def rotate_name(self, now: _dt.datetime) -> str:
        """A fresh name: never one that exists (a rename would replace it)."""
        stamp = now
        while True:
            name = f"{self.path}.{stamp.strftime('%Y%m%dT%H%M%S.%f')}Z"
            if not os.path.lexists(name):
                return name
            stamp += _dt.timedelta(microseconds=1)

    def prune(self, keep: int) -> list[str]:
        """Delete the oldest rotated files beyond ``keep`` (0: keep all)."""
        if keep <= 0:
            return []
        base = Path(self.path)
        rotated = sorted(p for p in base.parent.glob(base.name + ".*") if _STAMP.search(p.name))
        removed = []
        for old in rotated[: max(0, len(rotated) - keep)]:
            old.unlink(missing_ok=True)
            removed.append(str(old))
        return removed


def read_resume(path: str, *, window: int = 1 << 16, limit: int = 1 << 24) -> Resume:
    """The last complete line's seq and hash, reading backwards from the end."""
    resume = Resume()
    with open(path, "rb") as f:
        first = f.readline(limit)
        record = parse_line(first.rstrip(b"\n"))
        if record is None and first.endswith(b"\n"):
            resume.foreign = True
        elif record is not None:
            resume.started = _parse_ts(record.get("ts"))
        end = f.seek(0, os.SEEK_END)
        tail = b""
        pos = end
        while pos > 0 and len(tail) < limit:
            step = min(window, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            if tail.count(b"\n") >= 2 or (pos == 0 and b"\n" in tail):
                break
    resume.partial_tail = not tail.endswith(b"\n")
    lines = tail.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is partial or empty
    if not complete:
        resume.foreign = resume.foreign or not resume.partial_tail
        return resume
    last = complete[-1]
    record = parse_line(last)
    if record is None:
        resume.foreign = True
        return resume
    resume.seq, resume.head = int(record["seq"]), link(last)
    return resume


def _parse_ts(value: object) -> _dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def first_seq(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            record = parse_line(f.readline(1 << 24).rstrip(b"\n"))
    except OSError:
        return None
    return None if record is None else int(record["seq"])


def trail_files(targets: list[str]) -> Iterator[Path]:
    """Files in trail order: each directory's regular files sorted by their
    first record's seq (files that are not trails sort first, to be named)."""
    for target in targets:
        path = Path(target)
        if path.is_dir():
            files = [p for p in path.iterdir() if stat.S_ISREG(p.stat().st_mode)]
            keyed = sorted(files, key=lambda p: (first_seq(p) or -1, p.name))
            yield from keyed
        else:
            yield path
