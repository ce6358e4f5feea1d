"""``agent-proxy audit verify``: every kind of tampering is named, intact
trails pass, across SVID rotation and file rotation."""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.audit import AuditSettings, AuditSink
from proxy.audit.chain import link, sign_checkpoint
from proxy.cli import main
from tests.audit_support import request, signer_of, write_trail
from tests.pki import Issued, TestCA

SIDECAR = "spiffe://a.example/sidecar"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    # Backdated: the SVID rotation test signs with an SVID of two hours ago.
    return TestCA.create("a.example", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))


@pytest.fixture(scope="module")
def other_ca() -> TestCA:
    return TestCA.create("b.example")


@pytest.fixture(scope="module")
def svid(ca: TestCA) -> Issued:
    return ca.issue(SIDECAR)


@pytest.fixture
def bundle_args(tmp_path: Path, ca: TestCA, other_ca: TestCA) -> list[str]:
    (tmp_path / "a.pem").write_bytes(ca.bundle_pem())
    (tmp_path / "b.pem").write_bytes(other_ca.bundle_pem())
    return [
        "--bundle",
        f"a.example={tmp_path / 'a.pem'}",
        "--bundle",
        f"b.example={tmp_path / 'b.pem'}",
    ]


def verify(
    paths: list[Path], bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    capsys.readouterr()  # the sink's own log lines while the trail was written
    status = main(["audit", "verify", *map(str, paths), *bundle_args])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1, lines  # always one line
    return status, lines[0]


@pytest.fixture
def trail(tmp_path: Path, svid: Issued) -> Path:
    path = tmp_path / "audit.jsonl"
    write_trail(path, svid, 10)
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_intact_trail_verifies(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, line = verify([trail], bundle_args, capsys)
    assert status == 0
    assert line.startswith(
        "intact: 11 records (seq 1..11) in 1 file, 1 checkpoints signed by " + SIDECAR
    )


def test_records_carry_seq_and_prev_chain(trail: Path) -> None:
    lines = lines_of(trail)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == list(range(1, 12))
    assert records[0]["prev"] == "0" * 64
    for before, (line, record) in zip(
        lines, zip(lines[1:], records[1:], strict=True), strict=False
    ):
        assert record["prev"] == link(before)
        del line
    checkpoint = records[-1]
    assert checkpoint["event"] == "audit.checkpoint"
    assert checkpoint["count"] == 10 and checkpoint["head"] == checkpoint["prev"]


def test_edited_record_is_named(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(trail)
    lines[2] = lines[2].replace(b'"decision":"allow"', b'"decision":"deny"')
    rewrite(trail, lines)
    status, line = verify([trail], bundle_args, capsys)
    assert status == 1
    assert line.startswith(f"{trail}:3 seq 3: edited"), line


def test_edited_last_record_before_checkpoint(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(trail)
    lines[9] = lines[9].replace(b"/timesheets/9", b"/timesheets/8")
    rewrite(trail, lines)
    status, line = verify([trail], bundle_args, capsys)
    assert (status, line.split(": ")[0:2]) == (
        1,
        [f"{trail}:10 seq 10", "edited (its hash does not match the next record's prev)"],
    )


def test_deleted_record_is_named(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(trail)
    del lines[3]
    rewrite(trail, lines)
    status, line = verify([trail], bundle_args, capsys)
    assert status == 1
    assert line == f"{trail}:4 seq 5: deleted (seq 4 missing before this record)"


def test_inserted_record_is_named(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(trail)
    forged = json.loads(lines[2])
    forged["path"] = "/payroll/transfer"
    lines.insert(3, json.dumps(forged, separators=(",", ":")).encode())
    rewrite(trail, lines)
    status, line = verify([trail], bundle_args, capsys)
    assert status == 1
    assert line.startswith(f"{trail}:4 seq 3: inserted"), line


def test_reordered_records_are_named(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(trail)
    lines[4], lines[5] = lines[5], lines[4]
    rewrite(trail, lines)
    status, line = verify([trail], bundle_args, capsys)
    assert status == 1
    assert line.startswith(f"{trail}:5 seq 6: reordered (seq 5 comes later"), line


def _forge(trail: Path, signer: Issued) -> None:
    lines = lines_of(trail)
    checkpoint = json.loads(lines[-1])
    _, token = sign_checkpoint(
        signer_of([signer]),
        seq=checkpoint["seq"],
        head=checkpoint["head"],
        now=dt.datetime.now(dt.UTC),
    )
    checkpoint["jws"] = token
    lines[-1] = json.dumps(checkpoint, separators=(",", ":")).encode()
    rewrite(trail, lines)


def test_checkpoint_forged_with_another_trust_domains_key(
    trail: Path, other_ca: TestCA, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _forge(trail, other_ca.issue("spiffe://b.example/sidecar"))
    status, line = verify([trail], bundle_args, capsys)
    assert status == 1
    assert line.startswith(
        f"{trail}:11 seq 11: bad signature: signed by spiffe://b.example/sidecar"
    ), line


def test_checkpoint_claiming_our_id_but_minted_by_another_ca(
    trail: Path, other_ca: TestCA, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _forge(trail, other_ca.issue(SIDECAR))  # B's CA mints an SVID for A's ID
    status, line = verify([trail], bundle_args, capsys)
    assert status == 1
    assert "bad signature: signer not trusted" in line and "a.example" in line, line


def test_missing_signature(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(trail)
    checkpoint = json.loads(lines[-1])
    del checkpoint["jws"]
    lines[-1] = json.dumps(checkpoint, separators=(",", ":")).encode()
    rewrite(trail, lines)
    status, line = verify([trail], bundle_args, capsys)
    assert (status, line) == (1, f"{trail}:11 seq 11: missing signature")


def test_records_after_the_last_checkpoint_are_unsealed(
    trail: Path, svid: Issued, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    sink = AuditSink.open(str(trail))  # no signer: nothing seals these
    for i in range(3):
        sink.emit(request(i))
    sink.close()
    status, line = verify([trail], bundle_args, capsys)
    assert status == 1
    assert line == (
        f"{trail}:12 seq 12: unsealed: 3 records after the last checkpoint (seq 12..14); "
        "the chain is intact up to it"
    )


def test_truncated_last_line(
    trail: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    data = trail.read_bytes()
    trail.write_bytes(data[: len(data) - 40])  # a crash mid-write of the checkpoint
    status, line = verify([trail], bundle_args, capsys)
    assert (status, line) == (1, f"{trail}:11: truncated last line (crash mid-write)")


def test_restart_after_a_crash_mid_write_continues_the_chain(
    trail: Path, svid: Issued, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    data = trail.read_bytes()
    trail.write_bytes(data[: len(data) - 40])
    write_trail(trail, svid, 2)  # the sidecar restarts on the same file
    status, line = verify([trail], bundle_args, capsys)
    assert status == 0, line
    assert line.startswith("intact: 13 records (seq 1..13)")


def test_not_an_audit_trail(
    tmp_path: Path, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\nworld\n")
    status, line = verify([junk], bundle_args, capsys)
    assert (status, line) == (
        2,
        f"agent-proxy: error: {junk}: not an audit trail (no line carries seq and prev)",
    )


def test_not_an_audit_trail_as_a_process(tmp_path: Path) -> None:
    junk = tmp_path / "blob.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", str(junk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not an audit trail" in done.stderr
    assert "Traceback" not in done.stderr


def test_checkpoint_without_bundle_says_which(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, line = verify([trail], [], capsys)
    assert status == 2
    assert line.endswith("pass --bundle a.example=FILE to verify it")


def test_svid_rotation_and_file_rotation(
    tmp_path: Path, ca: TestCA, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An SVID that has since expired signed the early checkpoints; files
    rotated by size; the chain runs across them and verify walks the directory."""
    now = dt.datetime.now(dt.UTC)
    old = ca.issue(
        SIDECAR, not_before=now - dt.timedelta(hours=3), not_after=now - dt.timedelta(hours=1)
    )
    new = ca.issue(SIDECAR)
    holder = [old]
    clock = [now - dt.timedelta(hours=2)]
    directory = tmp_path / "trail"
    directory.mkdir()
    settings = AuditSettings(path=str(directory / "audit.jsonl"), max_bytes=1500)
    sink = AuditSink.open(settings, signer=signer_of(holder), clock=lambda: clock[0])
    for i in range(12):
        if i == 6:  # rotation: new key, new time
            holder[0], clock[0] = new, now
        sink.emit(request(i))
        sink.commit()
    sink.close()
    files = sorted(directory.iterdir())
    assert len(files) >= 3
    signers = set()
    for file in files:
        for line in lines_of(file):
            record = json.loads(line)
            if record["event"] == "audit.checkpoint":
                signers.add(
                    json.loads(base64.urlsafe_b64decode(record["jws"].split(".")[0] + "==")).get(
                        "x5c"
                    )[0]
                )
    assert len(signers) == 2  # both SVIDs signed checkpoints
    status, line = verify([directory], bundle_args, capsys)
    assert status == 0, line
    assert f"in {len([f for f in files if f.stat().st_size])} files" in line
    # The first record of each rotated-in file links to the last of the one before.
    ordered = [f for f in files if f.name != "audit.jsonl"] + [directory / "audit.jsonl"]
    ordered = [f for f in ordered if f.stat().st_size]
    for before, after in itertools.pairwise(ordered):
        assert json.loads(lines_of(after)[0])["prev"] == link(lines_of(before)[-1])


def test_deleted_file_in_the_middle_of_a_rotated_trail(
    tmp_path: Path, svid: Issued, bundle_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "trail"
    directory.mkdir()
    write_trail(
        directory / "audit.jsonl",
        svid,
        12,
        settings=AuditSettings(path=str(directory / "audit.jsonl"), max_bytes=1500),
    )
    rotated = sorted(p for p in directory.iterdir() if p.name != "audit.jsonl")
    assert len(rotated) >= 3
    rotated[1].unlink()
    status, line = verify([directory], bundle_args, capsys)
    assert status == 1 and ": deleted (seq " in line, line
