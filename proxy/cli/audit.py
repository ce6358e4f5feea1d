"""``agent-proxy audit verify`` and ``agent-proxy audit tail``.

verify: exit 0 and one summary line when the trail is intact and sealed;
exit 1 and one line naming the first bad record (file, line, seq) and what
is wrong; exit 2 for input that is no audit trail or a bad flag.
tail: the trail for a person (a table, colour on a terminal) or as JSON
lines, filtered, optionally following the file across rotation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from proxy.audit.files import first_seq
from proxy.errors import UsageError


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="verify and read audit trails")
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION")
    actions.required = True

    verify = actions.add_parser(
        "verify",
        help="check an audit trail's hash chain and signed checkpoints",
        description=(
            "Check every record's seq/prev link and every checkpoint's signature "
            "against the bundle of the signer's trust domain. Directories are "
            "walked in trail order (rotated files included)."
        ),
    )
    verify.add_argument("paths", nargs="+", metavar="FILE|DIR")
    verify.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="TD=FILE",
        help="trust bundle of the checkpoints' signer's trust domain (repeatable)",
    )
    verify.add_argument(
        "--signer",
        default=None,
        metavar="SPIFFE_ID",
        help="require this signer (default: the first checkpoint's)",
    )
    verify.set_defaults(handler=run_verify)

    tail = actions.add_parser(
        "tail",
        help="show audit records: a table on a terminal, or JSON lines",
    )
    tail.add_argument("path", nargs="?", default="-", metavar="FILE|-")
    tail.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep reading as records arrive, across rotation",
    )
    tail.add_argument(
        "--peer",
        default=None,
        metavar="PATTERN",
        help="peer SPIFFE ID glob, e.g. 'spiffe://payroll.example/*'",
    )
    tail.add_argument("--decision", choices=("allow", "deny"), default=None)
    tail.add_argument(
        "--event", default=None, metavar="GLOB", help="event glob, e.g. 'connection.*'"
    )
    tail.add_argument(
        "--since", default=None, metavar="DURATION", help="only records newer than this, e.g. 15m"
    )
    tail.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    tail.set_defaults(handler=run_tail)


def _bundles(values: list[str]) -> Any:
    from proxy.identity import BundleError, SpiffeIdError, TrustBundle, TrustBundleSet, TrustDomain

    bundles = []
    seen = set()
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise UsageError(f"--bundle {value!r}: expected TD=FILE")
        try:
            td = TrustDomain.parse(name)
            if td in seen:
                raise UsageError(f"--bundle: trust domain {td.name} given twice")
            seen.add(td)
            bundles.append(TrustBundle.load(td, Path(file)))
        except (BundleError, SpiffeIdError) as exc:
            raise UsageError(f"--bundle {value!r}: {exc}") from None
    return TrustBundleSet(bundles)


def run_verify(args: Any) -> int:
    from proxy.audit.files import trail_files
    from proxy.audit.verify import NotATrail, read_lines, verify

    bundles = _bundles(args.bundle)
    for path in args.paths:
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such file or directory")
    try:
        lines = read_lines(list(trail_files(args.paths)))
        report = verify(lines, bundles, args.signer)
    except NotATrail as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(report.message + "\n")
    return 0 if report.ok else 1


# -- tail -------------------------------------------------------------------


def run_tail(args: Any) -> int:
    import datetime as _dt

    from proxy.audit.tail import HEADER, Filter, render, row

    since = None
    if args.since is not None:
        from proxy.durations import parse_duration

        since = _dt.datetime.now(_dt.UTC) - parse_duration(args.since)
    wanted = Filter(peer=args.peer, decision=args.decision, event=args.event, since=since)
    out = sys.stdout
    colour = not args.json and out.isatty() and os.environ.get("NO_COLOR") is None
    if args.path != "-" and not os.path.isfile(args.path):
        raise UsageError(f"{args.path}: no such file")
    if not args.json:
        out.write(render(HEADER, colour=colour, header=True) + "\n")
    lines = _follow(args.path) if args.follow else _read_all(args.path)
    try:
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # a truncated or foreign line; verify reports those
            if not isinstance(record, dict) or not wanted.matches(record):
                continue
            if args.json:
                out.write(raw.rstrip("\n") + "\n")
            else:
                out.write(render(row(record), colour=colour) + "\n")
            if args.follow:
                out.flush()
    except BrokenPipeError:
        # `audit tail | head`: the reader left; not an error.
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), out.fileno())
    return 0


def _read_all(path: str) -> Iterator[str]:
    stream: IO[str] = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    with stream:
        yield from stream


def _follow(path: str, poll: float = 0.2) -> Iterator[str]:
    """Like ``tail -F``, without gaps: read to the end, then wait for more;
    when the path names a new file, finish the old one, then read every file
    rotated since (by seq) before following the new one."""
    if path == "-":
        yield from sys.stdin
        return
    last = [0]

    def fresh(line: bytes) -> bool:
        seq = _seq_of(line)
        if seq is None:
            return True
        if seq <= last[0]:
            return False
        last[0] = seq
        return True

    stream: IO[bytes] = open(path, "rb")  # noqa: SIM115
    partial = b""
    try:
        while True:
            chunk = stream.readline()
            if chunk:
                partial += chunk
                if partial.endswith(b"\n"):
                    if fresh(partial):
                        yield partial.decode("utf-8", "replace")
                    partial = b""
                continue
            if _rotated(stream, path):
                stream.close()
                while True:
                    before = last[0]
                    for rotated in _rotated_since(path, last[0]):
                        with rotated.open("rb") as old:
                            for line in old:
                                if line.endswith(b"\n") and fresh(line):
                                    yield line.decode("utf-8", "replace")
                    stream = _reopen(path, poll)
                    # Rotated again while we caught up? Catch up once more.
                    first = first_seq(Path(path))
                    if first is None or first <= last[0] + 1 or last[0] == before:
                        break
                    stream.close()
                partial = b""
                continue
            time.sleep(poll)  # an interactive reader polls; nothing here is a test wait
    finally:
        stream.close()


def _reopen(path: str, poll: float) -> IO[bytes]:
    """The file now at ``path``; between a rotation's rename and the new
    file there is none for a moment."""
    while True:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            time.sleep(poll)


def _seq_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    seq = record.get("seq") if isinstance(record, dict) else None
    return seq if isinstance(seq, int) else None


def _rotated_since(path: str, seq: int) -> list[Path]:
    base = Path(path)
    rotated = [p for p in base.parent.glob(base.name + ".*") if p.is_file()]
    keyed = [(first_seq(p), p) for p in rotated]
    ordered = sorted((s, p) for s, p in keyed if s is not None)
    # The file holding seq+1 may start before it: keep the last one at or below.
    start = max([i for i, (s, _) in enumerate(ordered) if s <= seq] or [0])
    return [p for _, p in ordered[start:]]


def _rotated(stream: IO[bytes], path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except OSError:
        return False  # between the rename and the new file: keep the old one
    mine = os.fstat(stream.fileno())
    return (on_disk.st_ino, on_disk.st_dev) != (
        mine.st_ino,
        mine.st_dev,
    ) or on_disk.st_size < stream.tell()
