"""Where the proxy pair spends its CPU: ``python -m benchmarks.profile``.

Deploys one contender (default ours-http) against the nginx backend, drives
it with wrk (keep-alive, 64 B responses; ``--close`` for a new connection
per request, ``--mcp`` for JSON-RPC tools/call through the MCP listeners)
and samples every proxy process
with py-spy (``pip install py-spy``) for the same seconds. Prints the top
frames by own time and by total time for each process, and keeps the raw
collapsed stacks (flamegraph input) in ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.contenders import CONTENDERS
from benchmarks.fixtures import (
    MCP_HEADERS,
    MCP_PATH,
    SMALL_PATH,
    make_backend,
    make_identities,
    which,
)
from benchmarks.harness import BenchError, Pinning, Proc, free_port, raise_nofile, taskset
from benchmarks.session import Run, deployed
from benchmarks.workloads import LUA, Settings, mcp_script

_LINE = re.compile(r":\d+\)$")
_PACKAGE = re.compile(r"\((?:.*/site-packages/|.*/lib/python3\.\d+/)?([^/]+)")

Counts = list[tuple[str, int]]


def top_frames(collapsed: Path, limit: int) -> tuple[Counts, Counts, Counts, int]:
    """(own time by function, total time by function, own time by package,
    samples) from py-spy's raw (collapsed) format; line numbers folded."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    package: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        found = _PACKAGE.search(frames[-1])
        package[found.group(1) if found else frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own.most_common(limit), total.most_common(limit), package.most_common(12), samples


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--contender", default="ours-http")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--top", type=int, default=25)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--close", action="store_true", help="Connection: close on every request")
    shape.add_argument("--mcp", action="store_true", help="POST tools/call to the MCP listeners")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "agent-proxy-profile")
    args = p.parse_args()
    py_spy, wrk = which("py-spy") or shutil.which("py-spy"), which("wrk")
    if py_spy is None or wrk is None:
        raise SystemExit("py-spy and wrk are needed (pip install py-spy; apt-get install wrk)")
    contender = next(c for c in CONTENDERS if c.key == args.contender)
    raise_nofile()
    pinning = Pinning.choose()
    root = Path(tempfile.mkdtemp(prefix="agent-proxy-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        ids = make_identities(root / "pki")
        backend = make_backend(root, free_port(), pinning.load, 1 << 20)
        run = Run(Settings(args.seconds, 1 << 20, 0), 1, pinning, ids, backend, root)
        backend_proc = Proc(backend.spec, root)
        try:
            backend_proc.wait_ready()
            with deployed(run, contender, root / "deploy") as (dep, procs):
                headers: tuple[str, ...] = ()
                script, url = LUA, f"http://127.0.0.1:{dep.client_port}{SMALL_PATH}"
                if args.close:
                    headers = ("Connection: close",)
                elif args.mcp:
                    if dep.mcp_port is None:
                        raise BenchError(f"{args.contender} has no MCP listeners")
                    headers, script = MCP_HEADERS, mcp_script()
                    url = f"http://127.0.0.1:{dep.mcp_port}{MCP_PATH}"
                extra = [arg for h in headers for arg in ("-H", h)]
                # Warm up (pools, first handshakes) before sampling.
                subprocess.run(taskset(pinning.load, [wrk, "-t1", "-c4", "-d1s", *extra, url]),
                               capture_output=True, check=False)  # fmt: skip
                spies = []
                for proc in procs:
                    out = args.out / f"{proc.spec.name}.txt"
                    spies.append((proc.spec.name, out, subprocess.Popen(
                        [py_spy, "record", "--pid", str(proc.popen.pid), "--format", "raw",
                         "--duration", str(int(args.seconds)), "--rate", "200", "--nonblocking",
                         "-o", str(out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )))  # fmt: skip
                wrk_argv = [wrk, "-t1", f"-c{args.conns}", f"-d{int(args.seconds)}s", "-s",
                            str(script), *extra, url]  # fmt: skip
                done = subprocess.run(taskset(pinning.load, wrk_argv), capture_output=True,
                                      text=True, check=False)  # fmt: skip
                for _, _, spy in spies:
                    spy.wait(args.seconds + 30)
        finally:
            backend_proc.stop()
    except BenchError as exc:
        raise SystemExit(f"profile: {exc}") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr)
    for name, out, _ in spies:
        if not out.exists():
            print(f"\n## {name}: no samples (py-spy needs ptrace rights)")
            continue
        own, total, package, samples = top_frames(out, args.top)
        print(f"\n## {name} ({samples} samples, raw stacks in {out})\n\nown time by package:")
        for frame, count in package:
            print(f"  {100 * count / samples:5.1f}%  {frame}")
        print("\nown time by function:")
        for frame, count in own:
            print(f"  {100 * count / samples:5.1f}%  {frame}")
        print("\ntotal time (frame on the stack):")
        for frame, count in total:
            print(f"  {100 * count / samples:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
