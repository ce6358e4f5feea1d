"""``audit verify``: check a trail's hash chain and checkpoint signatures.

Theory of operation: the files are read in trail order into one list of
lines; a walk checks each record's ``seq`` and ``prev`` against the line
before it. The first mismatch is diagnosed by looking one line around it:

* the next record links to the one before this line: this line was *inserted*;
* the seq follows but ``prev`` does not match: the line before was *edited*
  (or this one, if the next record does not link to this one either);
* ``prev`` matches but the seq does not: this line was *edited*;
* the seq jumps ahead: *reordered* if the missing seq appears later, else
  *deleted*; the seq goes back: *reordered*.

A line that is not JSON is a *truncated* record (crash mid-write) when it
is the file's unterminated last line, or when the next record links past it
to the record before it; otherwise it was edited. Records after the last
checkpoint are *unsealed*: reported as such, not as broken. The walk stops
at the first problem, so the answer is always one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.audit.chain import (
    CHECKPOINT,
    GENESIS,
    CheckpointProblem,
    link,
    parse_line,
    verify_checkpoint,
)
from proxy.identity import TrustBundleSet


class NotATrail(Exception):
    """Input that is no audit trail (exit status 2)."""


class NeedBundle(NotATrail):
    """A checkpoint whose signer's trust domain has no --bundle."""


@dataclass
class Line:
    path: Path
    number: int
    raw: bytes
    record: dict[str, Any] | None
    terminated: bool

    def where(self) -> str:
        seq = self.record.get("seq") if self.record is not None else None
        return f"{self.path}:{self.number}" + (f" seq {seq}" if seq is not None else "")


@dataclass
class Report:
    ok: bool
    message: str
    records: int = 0
    checkpoints: int = 0
    notes: list[str] = field(default_factory=list)


def read_lines(paths: list[Path]) -> list[Line]:
    lines: list[Line] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise NotATrail(f"{path}: cannot read: {exc.strerror or exc}") from None
        if not data:
            continue
        parts = data.split(b"\n")
        tail = parts.pop()  # b"" when the file ends with a newline
        mine = [Line(path, i, raw, parse_line(raw), True) for i, raw in enumerate(parts, 1) if raw]
        if tail:
            mine.append(Line(path, len(parts) + 1, tail, parse_line(tail), False))
        if not any(line.record is not None for line in mine):
            raise NotATrail(f"{path}: not an audit trail (no line carries seq and prev)")
        lines.extend(mine)
    if not lines:
        raise NotATrail("no audit records found")
    return lines


def verify(lines: list[Line], bundles: TrustBundleSet, signer: str | None = None) -> Report:
    report = Report(ok=True, message="")
    prev_hash: str | None = None
    expected: int | None = None
    last_checkpoint: Line | None = None
    first: Line | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        record = line.record
        if record is None:
            if not line.terminated or _links_past(lines, index, prev_hash):
                if index == len(lines) - 1:
                    return _fail(
                        report, f"{line.path}:{line.number}: truncated last line (crash mid-write)"
                    )
                report.notes.append(
                    f"{line.path}:{line.number}: truncated record (crash mid-write)"
                )
                index += 1
                continue
            return _fail(report, f"{line.path}:{line.number}: edited (not a valid record)")
        if (
            expected is not None
            and prev_hash is not None
            and (record["seq"] != expected or record["prev"] != prev_hash)
        ):
            return _fail(report, _diagnose(lines, index, expected, prev_hash))
        first = first or line
        if record.get("event") == CHECKPOINT:
            if not bundles.trust_domains:
                raise NeedBundle(_need_bundle(line, record))
            try:
                signer = verify_checkpoint(record, bundles, signer)
            except CheckpointProblem as exc:
                return _fail(report, f"{line.where()}: {exc}")
            last_checkpoint = line
            report.checkpoints += 1
        report.records += 1
        prev_hash, expected = link(line.raw), int(record["seq"]) + 1
        index += 1
    assert first is not None and first.record is not None and expected is not None
    last_seq = expected - 1
    start = int(first.record["seq"])
    span = f"seq {start}..{last_seq}"
    if first.record["prev"] != GENESIS:
        report.notes.append(f"starts at seq {start} (earlier files rotated away)")
    if last_checkpoint is None:
        return _fail(
            report,
            f"{first.where()}: unsealed: no checkpoint; "
            f"{report.records} records ({span}) carry no signature",
        )
    sealed = int(last_checkpoint.record["seq"]) if last_checkpoint.record else 0
    if sealed < last_seq:
        after = lines[lines.index(last_checkpoint) + 1]
        return _fail(
            report,
            f"{after.where()}: unsealed: {last_seq - sealed} records after the last checkpoint "
            f"(seq {sealed + 1}..{last_seq}); the chain is intact up to it",
        )
    files = len({line.path for line in lines})
    report.message = (
        f"intact: {report.records} records ({span}) in {files} file{'s' if files != 1 else ''}, "
        f"{report.checkpoints} checkpoints signed by {signer}"
    )
    return report


def _fail(report: Report, message: str) -> Report:
    report.ok, report.message = False, message
    return report


def _need_bundle(line: Line, record: dict[str, Any]) -> str:
    signer = str(record.get("local_id") or "the signer")
    domain = (
        signer.removeprefix("spiffe://").split("/", 1)[0]
        if signer.startswith("spiffe://")
        else "TD"
    )
    return (
        f"{line.where()}: checkpoint signed by {signer}: pass --bundle {domain}=FILE to verify it"
    )


def _links_past(lines: list[Line], index: int, prev_hash: str | None) -> bool:
    nxt = lines[index + 1].record if index + 1 < len(lines) else None
    return nxt is not None and prev_hash is not None and nxt["prev"] == prev_hash


def _diagnose(lines: list[Line], index: int, expected: int, prev_hash: str) -> str:
    line = lines[index]
    record = line.record
    assert record is not None
    seq, prev = int(record["seq"]), record["prev"]
    nxt = lines[index + 1].record if index + 1 < len(lines) else None
    mine = link(line.raw)
    linked = any(other.record is not None and other.record["prev"] == mine for other in lines)
    if seq != expected and linked:  # a genuine record (its successor links to it), misplaced
        for later in lines[index + 1 :]:
            if later.record is not None and later.record["seq"] == expected:
                at = f"{later.path}:{later.number}"
                return f"{line.where()}: reordered (seq {expected} comes later, at {at})"
        if seq < expected:
            return f"{line.where()}: reordered (seq {seq} after seq {expected - 1})"
    if nxt is not None and nxt["prev"] == prev_hash and nxt["seq"] == expected:
        return f"{line.where()}: inserted (the next record links to the one before it)"
    if seq == expected:
        if nxt is not None and nxt["prev"] != link(line.raw):
            return f"{line.where()}: edited (its prev does not match the record before it)"
        before = _previous_record(lines, index)
        where = before.where() if before is not None else line.where()
        return f"{where}: edited (its hash does not match the next record's prev)"
    if prev == prev_hash:
        return f"{line.where()}: edited (seq {seq} does not follow seq {expected - 1})"
    if seq > expected:
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
        return f"{line.where()}: deleted ({missing} missing before this record)"
    return f"{line.where()}: reordered (seq {seq} after seq {expected - 1})"


def _previous_record(lines: list[Line], index: int) -> Line | None:
    for line in reversed(lines[:index]):
        if line.record is not None:
            return line
    return None
