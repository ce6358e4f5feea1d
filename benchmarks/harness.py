"""Process and measurement plumbing shared by every contender and workload.

Theory of operation: every process the benchmark starts runs in its own
session (so its process group id is its pid). That gives one handle for the
whole tree a server forks (nginx master + worker): we count CPU and memory
over every pid in the group, and stopping the group stops the tree. Readiness
is always an event with a deadline (a port accepting connections), never a
fixed sleep; the short pauses between probes only keep us from spinning.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_DEADLINE = 20.0


class BenchError(Exception):
    """A contender or workload could not produce a number; the text goes in its cell."""


def pause(seconds: float) -> None:
    # A wait between probes of an event we are polling for (a port, a line).
    threading.Event().wait(seconds)


_HANDED_OUT: set[int] = set()
# Below Linux's ephemeral range (32768-60999 by default): a test suite running
# beside us binds port 0 and connects from ephemeral ports, so picking our
# listen ports here keeps the two from landing on the same port between our
# check and the server's bind.
_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A loopback port nobody holds now and that we have not handed out yet."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise BenchError(f"no free port in {_PORT_RANGE}")


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (inherited by every child) so 10,000 idle
    connections fit: a proxy process holds two sockets per connection, the
    harness one. As root the hard limit is raised too (up to fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))
            hard = want
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_list() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the load side and the proxies may use.

    With two or more CPUs the load client and backend share the first CPU and
    every proxy process shares another one, so a proxy pair always has exactly
    one core and the client cannot steal it. With one CPU nothing is pinned.
    """

    load: str | None
    proxy: str | None

    @staticmethod
    def choose() -> Pinning:
        cpus = cpu_list()
        if len(cpus) < 2:
            return Pinning(None, None)
        return Pinning(str(cpus[0]), str(cpus[1]))

    def describe(self) -> str:
        if self.load is None:
            return "not pinned (one CPU)"
        return (
            f"load client, backend nginx and harness on CPU {self.load}; "
            f"every proxy process on CPU {self.proxy} (taskset)"
        )


def taskset(cpus: str | None, argv: Sequence[str]) -> list[str]:
    return list(argv) if cpus is None else ["taskset", "-c", cpus, *argv]


@dataclass
class ProcSpec:
    """How to start one long-running process and how to know it is ready."""

    name: str
    argv: list[str]
    ready_port: int | None = None
    cpus: str | None = None
    env: dict[str, str] | None = None

    def command(self) -> str:
        return shlex.join(taskset(self.cpus, self.argv))


@dataclass
class Proc:
    spec: ProcSpec
    logdir: Path
    popen: subprocess.Popen[bytes] = field(init=False)
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stderr_path = self.logdir / f"{self.spec.name}.stderr"
        stdout_path = self.logdir / f"{self.spec.name}.stdout"
        with open(stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                taskset(self.spec.cpus, self.spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **(self.spec.env or {})},
                # Own session: the pgid names the whole tree (see module doc).
                start_new_session=True,
            )

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def check_alive(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            raise BenchError(f"{self.spec.name} exited with {rc}: {self.tail()}")

    def wait_ready(self, deadline: float = START_DEADLINE) -> None:
        # Every contender binds a port we chose, so "accepts a connection" is
        # the one readiness event that works for all of them.
        if self.spec.ready_port is not None:
            wait_for_port(self.spec.ready_port, deadline, self.check_alive)

    def pids(self) -> list[int]:
        return pids_in_group(self.pgid)

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        # Workers can outlive a master that died first; sweep the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)


def wait_for_port(port: int, deadline: float, alive: Callable[[], None] | None = None) -> None:
    end = time.monotonic() + max(deadline, 0.1)
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if alive is not None:
                alive()
            if time.monotonic() > end:
                raise BenchError(f"port {port} did not open within {deadline:.0f}s") from None
            pause(0.02)


def pids_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # Field 5 of /proc/PID/stat is the pgrp (index 2 after the comm split).
        if fields is not None and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses; everything after the last ')' is fixed.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of each process (all its threads, live or exited)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # utime and stime are fields 14 and 15 of stat: indexes 11 and 12 here.
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def memory_kib(pids: Sequence[int]) -> tuple[int, int]:
    """(sum of Pss, sum of Rss) in KiB. Pss splits pages shared between a
    master and its worker, so a two-process server is not counted twice."""
    pss = rss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss += int(rest.split()[0])
            elif key == "Rss":
                rss += int(rest.split()[0])
    return pss, rss


def run_tool(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a short-lived tool (wrk, openssl) and return its output; a hang is an error."""
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s") from exc
