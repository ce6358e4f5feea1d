"""Entry point: ``python -m benchmarks.run [--quick]`` (``make bench`` / ``make bench-quick``).

Sets the machine up (file limit, CPU pinning, missing Debian peers, a temp
directory, identities, the nginx backend), runs the identity self-test and
the round-robin repetitions (benchmarks/session.py), then writes
benchmarks/results/latest.md and latest.png (``--quick``: quick.md and
quick.png, untracked) and prints the ratio table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from benchmarks.contenders import CONTENDERS
from benchmarks.document import machine_info, report_stem, write_report
from benchmarks.fixtures import ensure_packages, make_backend, make_identities
from benchmarks.harness import Pinning, Proc, free_port, raise_nofile
from benchmarks.session import Run, log, run_contender, selftests
from benchmarks.workloads import Settings

RESULTS_DIR = Path(__file__).with_name("results")


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short cells, one repetition (~2 min)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk/s_time cell (10, quick 2)")
    p.add_argument("--stream-mib", type=int, help="bulk stream size in MiB (default 1024)")
    p.add_argument("--idle-conns", type=int, default=1000, help="idle connections (1000)")
    p.add_argument("--only", help="comma-separated contender keys (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument(
        "--skip-selftest", action="store_true", help="skip the impostor identity self-test"
    )
    return p.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every finally block stops its processes.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()
    mode = "quick" if args.quick else "full"
    nofile = raise_nofile()
    settings = Settings(
        duration=args.duration or (2.0 if args.quick else 10.0),
        stream_bytes=(args.stream_mib or 1024) << 20,
        idle_conns=args.idle_conns,
        # Each proxy process holds two sockets per relayed connection.
        idle_big=0 if args.quick else min(10_000, (nofile - 200) // 2),
    )
    reps = args.reps or (1 if args.quick else 3)
    contenders = list(CONTENDERS)
    if args.only:
        keys = set(args.only.split(","))
        contenders = [c for c in contenders if c.key in keys]
    pinning = Pinning.choose()
    if pinning.load is not None:
        # The harness is part of the load side (it drives the stream and idle clients).
        os.sched_setaffinity(0, {int(pinning.load)})
    notes: list[str] = []
    ensure_packages(notes)
    loads_start = _loadavg()
    root = Path(tempfile.mkdtemp(prefix="agent-proxy-bench-"))
    run: Run | None = None
    log(f"bench: {mode} run, {reps} rep(s), {settings.duration:g}s cells, work dir {root}")
    try:
        ids = make_identities(root / "pki")
        backend = make_backend(root, free_port(), pinning.load, settings.stream_bytes)
        run = Run(settings, reps, pinning, ids, backend, root)
        backend_proc = Proc(backend.spec, root)
        try:
            backend_proc.wait_ready()
            available = {c.key: c.unavailable() for c in contenders}
            if not args.skip_selftest:
                selftests(run, contenders, available)
            for rep in range(reps):
                for c in contenders:
                    run_contender(run, c, rep, available[c.key])
                    backend_proc.check_alive()
        finally:
            backend_proc.stop()
        wall = time.monotonic() - began
        # Before the work dir goes: the report's key-exchange line runs a
        # handshake with the run's identities, which live there.
        printed = write_report(
            run, contenders, mode, wall, [*notes, *run.notes], machine_info(pinning), args.out,
            (loads_start, _loadavg()),
        )  # fmt: skip
    finally:
        # Logs, audit files and configs are what explains a failure: keep them.
        if args.keep or (run is not None and run.had_errors()):
            log(f"bench: kept {root} (logs, audit records, configs)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(printed)
    stem = report_stem(mode)
    print(f"\nwrote {args.out / f'{stem}.md'} and {args.out / f'{stem}.png'} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
