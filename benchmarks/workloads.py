"""The workloads: each drives one running contender and returns samples for
one or more rows of the table.

A sample is a real measurement or an error string, never a placeholder
number. CPU per request is read from /proc (utime + stime of every process
of the contender) around the wrk run that produced the request count.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fixtures import (
    GIB_PATH,
    MCP_CALL,
    MCP_HEADERS,
    MCP_PATH,
    MIB_PATH,
    SMALL_PATH,
    Identities,
    which,
)
from benchmarks.harness import BenchError, Pinning, cpu_seconds, memory_kib, run_tool, taskset

LUA = Path(__file__).with_name("wrk_report.lua")
WARMUP_S = 1.0  # the unmeasured run before each wrk row


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    decimals: int = 0


ROWS: tuple[Row, ...] = (
    Row("ka_rps", "keep-alive, 64 B responses", "req/s", True),
    Row("ka_p50", "keep-alive p50 latency", "ms", False, 2),
    Row("ka_p99", "keep-alive p99 latency", "ms", False, 2),
    Row("close_rps", "new connection per request (Connection: close)", "req/s", True),
    Row("mib_rps", "1 MiB responses, keep-alive", "req/s", True, 1),
    Row("bulk_mbps", "bulk stream, one connection", "MB/s", True),
    Row("hs_rate", "full handshakes, inbound side (s_time -new)", "handshakes/s", True),
    Row("cpu_ka", "proxy CPU per keep-alive request", "µs", False, 1),
    Row("cpu_close", "proxy CPU per new-connection request", "µs", False, 1),
    Row("mem_idle", "memory (PSS) with idle connections held", "MiB", False, 1),
    Row("mem_idle_10k", "memory (PSS) with 10,000 idle connections held", "MiB", False, 1),
    Row("mcp_rps", "MCP tools/call, keep-alive (ours: judged per call)", "req/s", True),
    Row("cpu_mcp", "proxy CPU per MCP tools/call", "µs", False, 1),
    Row("startup", "start-up, spawn to accepting (both sides)", "s", False, 2),
    Row("help_s", "`agent-proxy --help` (ours)", "s", False, 2),
    Row("ready_s", "`agent-proxy run` spawn to its listening line (ours)", "s", False, 2),
)
ROW_BY_KEY = {r.key: r for r in ROWS}


@dataclass
class Sample:
    value: float | None
    error: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Settings:
    duration: float  # seconds per wrk / s_time cell
    stream_bytes: int
    idle_conns: int
    # Connections for the "10,000 idle" row: full runs only (it takes
    # minutes), and capped by the file limit (run.py): 0 skips the row.
    idle_big: int = 0
    ka_conns: int = 32
    close_conns: int = 8
    mib_conns: int = 8


@dataclass
class Target:
    """A running contender as the workloads see it."""

    client_port: int
    inbound_port: int | None
    pids: Callable[[], list[int]]  # every process of the proxy pair
    has_proxies: bool
    mcp_port: int | None = None  # where MCP calls go; None: client_port


@dataclass
class Recorder:
    """Remembers the first exact command of each kind for the report."""

    commands: dict[str, str] = field(default_factory=dict)

    def note(self, kind: str, argv: Sequence[str]) -> None:
        self.commands.setdefault(kind, shlex.join(argv))

    def describe(self, kind: str, text: str) -> None:
        self.commands.setdefault(kind, f"# {text}")


@dataclass(frozen=True)
class Env:
    """What every workload may use besides the target."""

    settings: Settings
    ids: Identities
    pinning: Pinning
    recorder: Recorder


Workload = Callable[[Target, Env], dict[str, Sample]]


# -- wrk ------------------------------------------------------------------------


def _wrk(
    target: Target,
    env: Env,
    kind: str,
    path: str,
    conns: int,
    headers: Sequence[str] = (),
    script: Path = LUA,
    port: int | None = None,
) -> tuple[dict[str, float], float | None]:
    """One wrk run; returns its summary and the proxies' CPU seconds during it."""
    s, pin, rec = env.settings, env.pinning, env.recorder
    wrk = which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed")
    argv = [wrk, "-t1", f"-c{conns}", f"-d{s.duration:g}s", "--timeout", "10s", "-s", str(script)]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{port or target.client_port}{path}")
    argv = taskset(pin.load, argv)
    rec.note(kind, argv)
    # Steady state, for every contender alike: an unmeasured run first fills
    # pools and caches (an HTTP proxy's upstream connections, our lazily
    # imported modules); cold start has rows of its own.
    warm = [*argv]
    warm[warm.index(f"-d{s.duration:g}s")] = f"-d{WARMUP_S:g}s"
    run_tool(warm, timeout=WARMUP_S + 60)
    pids = target.pids() if target.has_proxies else []
    cpu0 = cpu_seconds(pids)
    done = run_tool(argv, timeout=s.duration + 60)
    cpu = cpu_seconds(pids) - cpu0 if target.has_proxies else None
    match = re.search(r"^WRKJSON (.*)$", done.stdout, re.M)
    if match is None:
        raise BenchError(f"wrk failed: {(done.stderr or done.stdout).strip()[-200:]}")
    summary = {k: float(v) for k, v in json.loads(match.group(1)).items()}
    ok = summary["requests"] - summary["status_errors"]
    if ok <= 0:
        raise BenchError(f"no successful requests ({_errors(summary)})")
    return summary, cpu


def _errors(summary: dict[str, float]) -> str:
    kinds = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    parts = [f"{int(summary[k])} {k.replace('_errors', '')}" for k in kinds if summary[k]]
    return "wrk errors: " + ", ".join(parts) if parts else "no errors"


def _error_note(summary: dict[str, float]) -> str | None:
    bad = sum(
        summary[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    # wrk counts a few read errors when it closes its own connections at the end.
    return _errors(summary) if bad > max(10, 0.001 * summary["requests"]) else None


def _rate(summary: dict[str, float]) -> float:
    return (summary["requests"] - summary["status_errors"]) / (summary["duration_us"] / 1e6)


def _cpu_per_request(cpu: float | None, summary: dict[str, float]) -> Sample:
    if cpu is None:
        return Sample(None, error="n/a (no proxy)")
    return Sample(cpu * 1e6 / (summary["requests"] - summary["status_errors"]))


def keepalive(t: Target, env: Env) -> dict[str, Sample]:
    summary, cpu = _wrk(t, env, "keep-alive", SMALL_PATH, env.settings.ka_conns)
    note = _error_note(summary)
    return {
        "ka_rps": Sample(_rate(summary), note=note),
        "ka_p50": Sample(summary["p50_us"] / 1000),
        "ka_p99": Sample(summary["p99_us"] / 1000),
        "cpu_ka": _cpu_per_request(cpu, summary),
    }


def new_connection(t: Target, env: Env) -> dict[str, Sample]:
    conns = env.settings.close_conns
    summary, cpu = _wrk(t, env, "new connection", SMALL_PATH, conns, ["Connection: close"])
    return {
        "close_rps": Sample(_rate(summary), note=_error_note(summary)),
        "cpu_close": _cpu_per_request(cpu, summary),
    }


def mcp_script() -> Path:
    """wrk's report script with a POSTed tools/call body."""
    body = MCP_CALL.replace("\\", "\\\\").replace("'", "\\'")
    path = Path(tempfile.gettempdir()) / f"agent-proxy-bench-mcp-{os.getpid()}.lua"
    path.write_text(f"wrk.method = 'POST'\nwrk.body = '{body}'\n" + LUA.read_text())
    return path


def mcp_calls(t: Target, env: Env) -> dict[str, Sample]:
    """JSON-RPC tools/call over keep-alive. Our pair runs mcp listeners that
    parse and judge each call; the peers relay the same bytes as HTTP."""
    summary, cpu = _wrk(t, env, "MCP tools/call", MCP_PATH, env.settings.ka_conns,
                        MCP_HEADERS, mcp_script(), t.mcp_port)  # fmt: skip
    return {
        "mcp_rps": Sample(_rate(summary), note=_error_note(summary)),
        "cpu_mcp": _cpu_per_request(cpu, summary),
    }


def mib_responses(t: Target, env: Env) -> dict[str, Sample]:
    summary, _ = _wrk(t, env, "1 MiB", MIB_PATH, env.settings.mib_conns)
    return {"mib_rps": Sample(_rate(summary), note=_error_note(summary))}


# -- bulk stream ------------------------------------------------------------------


def _read_head(sock: socket.socket) -> tuple[int, int, bytes]:
    """Read a response head; return (status, content-length, body bytes already read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError(f"connection closed before the response head ({len(data)} B)")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, length, rest


def bulk_stream(t: Target, env: Env) -> dict[str, Sample]:
    """GET one large sparse file over one connection; MB/s from request to last byte.

    The client is the harness itself (recv_into a 1 MiB buffer, pinned to the
    load CPU); it is far faster than any proxy pair here, so it is not the limit.
    """
    s = env.settings
    env.recorder.describe(
        "bulk stream",
        f"harness (Python socket, pinned with the load): GET {GIB_PATH} ({s.stream_bytes} B) "
        "through the client side, recv_into a 1 MiB buffer; MB/s = bytes / request-to-last-byte",
    )
    buf = memoryview(bytearray(1 << 20))
    with socket.create_connection(("127.0.0.1", t.client_port), timeout=60) as sock:
        start = time.monotonic()
        sock.sendall(f"GET {GIB_PATH} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
        status, length, rest = _read_head(sock)
        if status != 200 or length != s.stream_bytes:
            raise BenchError(f"unexpected response: status {status}, length {length}")
        got = len(rest)
        while got < length:
            n = sock.recv_into(buf)
            if n == 0:
                raise BenchError(f"stream ended after {got} of {length} bytes")
            got += n
        elapsed = time.monotonic() - start
    return {"bulk_mbps": Sample(got / elapsed / 1e6)}


def probe(port: int) -> str:
    """One GET through the client side: "ACCEPTED" on a 200, else how it was refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET {SMALL_PATH} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            status, _, _ = _read_head(sock)
    except (OSError, BenchError, ValueError, IndexError) as exc:
        return f"refused ({type(exc).__name__ if isinstance(exc, OSError) else exc})"
    return "ACCEPTED" if status == 200 else f"refused (HTTP {status})"


# -- handshakes -------------------------------------------------------------------


def handshakes(t: Target, env: Env) -> dict[str, Sample]:
    if t.inbound_port is None:
        return {"hs_rate": Sample(None, error="n/a (no TLS)")}
    s, ids = env.settings, env.ids
    openssl = which("openssl")
    if openssl is None:
        raise BenchError("openssl is not installed")
    argv = taskset(env.pinning.load, [
        openssl, "s_time", "-connect", f"127.0.0.1:{t.inbound_port}", "-new",
        "-time", f"{max(1, round(s.duration))}",
        "-cert", str(ids.client.cert), "-key", str(ids.client.key),
        "-CAfile", str(ids.client.bundle),
    ])  # fmt: skip
    env.recorder.note("handshakes", argv)
    start = time.monotonic()
    done = run_tool(argv, timeout=s.duration + 60)
    elapsed = time.monotonic() - start
    # "N connections in X real seconds": N is exact; X is whole seconds, so we
    # divide by the wall time we measured around the run instead.
    match = re.search(r"(\d+) connections in \d+ real seconds", done.stdout)
    if match is None or int(match.group(1)) == 0:
        last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"s_time failed (exit {done.returncode}): {last[0][-200:]}")
    note = "s_time reported errors" if "ERROR" in done.stdout + done.stderr else None
    return {"hs_rate": Sample(int(match.group(1)) / elapsed, note=note)}


# -- idle connections -----------------------------------------------------------


def idle_memory(t: Target, env: Env) -> dict[str, Sample]:
    """Open N connections through the client side, make one keep-alive request
    on each (so HTTP-mode proxies also open their upstream side), hold them
    idle, then sum the PSS of every proxy process."""
    if not t.has_proxies:
        return {"mem_idle": Sample(None, error="n/a (no proxy)")}
    s = env.settings
    env.recorder.describe(
        "idle memory",
        f"harness: {s.idle_conns} connections to the client side in batches of 100, one "
        f"keep-alive GET {SMALL_PATH} each, all held open; then PSS of every proxy process",
    )
    return {"mem_idle": _idle_pss(t, s.idle_conns)}


def idle_memory_10k(t: Target, env: Env) -> dict[str, Sample]:
    if not t.has_proxies:
        return {"mem_idle_10k": Sample(None, error="n/a (no proxy)")}
    count = env.settings.idle_big
    if not count:
        return {"mem_idle_10k": Sample(None, error="n/a (make bench only)")}
    env.recorder.describe("idle memory, 10,000", f"as idle memory, with {count:,} connections")
    sample = _idle_pss(t, count)
    if count < 10_000:
        sample.note = f"{count:,} connections: the file limit allows no more"
    return {"mem_idle_10k": sample}


def _idle_pss(t: Target, count: int) -> Sample:
    request = f"GET {SMALL_PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    socks: list[socket.socket] = []
    try:
        for first in range(0, count, 100):
            batch = []
            for _ in range(first, min(first + 100, count)):
                sock = socket.create_connection(("127.0.0.1", t.client_port), timeout=30)
                socks.append(sock)
                batch.append(sock)
                sock.sendall(request)
            for sock in batch:
                status, length, rest = _read_head(sock)
                while len(rest) < length:
                    more = sock.recv(65536)
                    if not more:
                        raise BenchError("connection closed mid-response")
                    rest += more
                if status != 200:
                    raise BenchError(f"status {status} on an idle-connection request")
        # Every connection must still be open: readable now means EOF or junk.
        readable = _readable(socks)
        if readable:
            raise BenchError(f"{len(readable)} of {len(socks)} connections closed while idle")
        pss, _rss = memory_kib(t.pids())
        return Sample(pss / 1024)
    finally:
        for sock in socks:
            sock.close()
        _settle(t.pids())


def _settle(pids: list[int], *, quiet: float = 0.02, longest: float = 120.0) -> None:
    """Wait until the proxies are idle again (under ``quiet`` of a core for a
    second): closing thousands of connections keeps a slow closer busy for a
    while, and the next row (handshakes) would measure that instead."""
    deadline = time.monotonic() + longest
    last = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pids)
        if now - last < quiet:
            return
        last = now


def _readable(socks: list[socket.socket]) -> list[socket.socket]:
    # poll(), not select(): select() cannot take descriptors above 1023.
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(0)]


# Order matters: memory is read first, on freshly started processes.
WORKLOADS: tuple[tuple[str, Workload, tuple[str, ...]], ...] = (
    ("idle memory", idle_memory, ("mem_idle",)),
    ("idle memory, 10,000", idle_memory_10k, ("mem_idle_10k",)),
    ("handshakes", handshakes, ("hs_rate",)),
    ("keep-alive", keepalive, ("ka_rps", "ka_p50", "ka_p99", "cpu_ka")),
    ("MCP tools/call", mcp_calls, ("mcp_rps", "cpu_mcp")),
    ("new connection", new_connection, ("close_rps", "cpu_close")),
    ("1 MiB", mib_responses, ("mib_rps",)),
    ("bulk stream", bulk_stream, ("bulk_mbps",)),
)
