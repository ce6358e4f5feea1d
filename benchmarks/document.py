"""The Markdown report: tables, method, machine, exact commands, configs."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

from benchmarks.chart import write_chart
from benchmarks.contenders import Contender
from benchmarks.fixtures import GIB, Identities, Identity, which
from benchmarks.harness import Pinning
from benchmarks.report import (
    identity_table,
    markdown_table,
    problems_list,
    summarize,
    targets_table,
)
from benchmarks.session import Run
from benchmarks.workloads import WARMUP_S


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout + done.stderr).strip()
    for line in text.splitlines():
        if line.strip() and "inetd" not in line:
            return line.strip()
    return "unavailable"


def machine_info(pinning: Pinning) -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from OpenSSL import SSL

        ours_ssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except ImportError:
        ours_ssl = "unknown"
    tools = {
        "nginx": [which("nginx") or "nginx", "-v"],
        "HAProxy": [which("haproxy") or "haproxy", "-v"],
        "stunnel": [which("stunnel4") or which("stunnel") or "stunnel", "-version"],
        "wrk": [which("wrk") or "wrk", "-v"],
    }
    return [
        f"- CPU: {os.cpu_count()} cores ({model}); pinning: {pinning.describe()}",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- system OpenSSL (peers, wrk, s_time): {_first_line(['openssl', 'version'])}",
        f"- our OpenSSL (pyOpenSSL/cryptography wheel): {ours_ssl}",
        f"- Python: {platform.python_version()}",
        *(f"- {name}: {_first_line(argv)}" for name, argv in tools.items()),
    ]


def key_exchange(server_id: Identity, client_id: Identity) -> str:
    """The group our OpenSSL negotiates between two of its own endpoints
    with library defaults (our TLS contexts set no groups): one handshake
    over a socket pair with the run's identities. The C peers use the
    system OpenSSL, whose groups may differ: the report says which."""
    import socket

    from OpenSSL import SSL

    def context(identity: Identity, server: bool) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate_chain_file(str(identity.cert))
        ctx.use_privatekey_file(str(identity.key))
        ctx.load_verify_locations(str(identity.bundle))
        ctx.set_verify(SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server else 0))
        return ctx

    a, b = socket.socketpair()
    try:
        server = SSL.Connection(context(server_id, True), a)
        server.set_accept_state()
        client = SSL.Connection(context(client_id, False), b)
        client.set_connect_state()
        a.setblocking(False)
        b.setblocking(False)
        done = [False, False]
        for _ in range(100):
            for i, conn in enumerate((client, server)):
                if not done[i]:
                    try:
                        conn.do_handshake()
                        done[i] = True
                    except SSL.WantReadError:
                        pass
            if all(done):
                return client.get_group_name() or "unknown"
        return "unknown (no handshake)"
    except (SSL.Error, OSError) as exc:
        return f"unknown ({exc})"
    finally:
        a.close()
        b.close()


def _system_has_mlkem() -> bool:
    try:
        done = subprocess.run(
            ["openssl", "list", "-kem-algorithms"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "ML-KEM" in done.stdout.upper().replace("MLKEM", "ML-KEM")


def key_exchange_line(ids: Identities) -> str:
    ours = key_exchange(ids.server, ids.client)
    system = (
        "which offers ML-KEM too"
        if _system_has_mlkem()
        else "which has no ML-KEM: they negotiate X25519"
    )
    return (
        f"- Key exchange: ours negotiates **{ours}** between its own sidecars (the OpenSSL of "
        f"the cryptography wheel, library defaults; measured with one handshake); the peers use "
        f"the system OpenSSL, {system}. A post-quantum hybrid costs more CPU per handshake and "
        "keeps more memory per connection than X25519 alone; ours keeps it as its default."
    )


def report_stem(mode: str) -> str:
    """The name of a run's report: the committed ``latest`` is only ever a
    full run (``make bench``); a quick run (1 repetition, 2 s cells) writes
    ``quick.md`` beside it, so trying the bench never replaces the numbers
    the project quotes with noisier ones."""
    return "latest" if mode == "full" else "quick"


def write_report(
    run: Run, contenders: Sequence[Contender], mode: str, wall: float, notes: Sequence[str],
    machine: Sequence[str], out_dir: Path, loads: tuple[str, str],
) -> str:  # fmt: skip
    table = summarize(run.results, contenders)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(mode)
    png = out_dir / f"{stem}.png"
    chart_error = write_chart(table, contenders, png, f"agent-mtls-proxy benchmark ({mode})")
    s = run.settings
    ratio_table = markdown_table(table, contenders)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "make bench-quick" if mode == "quick" else "make bench"
    chart = f"![ratio chart]({stem}.png)" if chart_error is None else f"(no chart: {chart_error})"
    commands = [
        "Identities (`agent-proxy ca`, ECDSA P-256, URI SAN only):",
        "```sh",
        *run.ids.commands,
        "```",
        "Backend:",
        "```sh",
        run.backend.spec.command(),
        "```",
        "Load (first occurrence of each; the port and paths change per contender):",
        "```sh",
        *(f"# {kind}\n{line}" for kind, line in run.recorder.commands.items()),
        "```",
        "Contenders (server side first):",
        "```sh",
        *(
            f"# {key}\n" + ("\n".join(cmds) or "# (no proxies)")
            for key, cmds in run.start_commands.items()
        ),
        "```",
    ]
    configs = [
        f"<details><summary>{name}</summary>\n\n```\n{text}```\n</details>\n"
        for key in run.configs
        for name, text in run.configs[key].items()
    ]
    configs.insert(
        0, f"<details><summary>backend.conf</summary>\n\n```\n{run.backend.config}```\n</details>\n"
    )
    text = f"""# agent-mtls-proxy benchmark — {mode} run

<!-- written by benchmarks/run.py; $WORK below is the run's temp directory -->

`{cmd}` on {now}: {run.reps} repetition(s), {s.duration:g} s per wrk/s_time cell,
{s.stream_bytes / GIB:g} GiB bulk stream, {s.idle_conns} idle connections; wall time {wall:.0f} s.
Each cell: **ratio to the best peer** (stunnel, HAProxy, nginx; never ours or direct) with the
median absolute value in parentheses. ⚠ marks a cell with errors or failed repetitions,
listed under "Problems". n/a means the contender cannot run that workload here.

{ratio_table}

{chart}

## Targets (reported, not asserted)

{targets_table(table, contenders)}

## How each contender checks the peer's identity

All SVIDs come from `agent-proxy ca issue` and carry only a URI SAN
(`spiffe://bench.example/...`), so peers that can only match DNS names or a CN cannot
check the SPIFFE ID; they verify the chain against the CA and, where they can, pin the
peer's leaf certificate instead (stricter than an ID match, and equally cheap).

{identity_table(contenders, run.selftest)}

## Method

- Topology: load client → client-side proxy (plain HTTP on loopback) → mTLS (TLS 1.3,
  ECDSA P-256) → server-side proxy → nginx backend (`worker_processes 1`, sendfile,
  64 B / 1 MiB files and a sparse {s.stream_bytes / GIB:g} GiB file). Everything on 127.0.0.1.
{key_exchange_line(run.ids)}
- One worker per proxy process: nginx `worker_processes 1`, HAProxy `nbthread 1`, ours one
  trio thread; stunnel has no such mode (a thread per connection).
- Session resumption is off on every client side (ours never resumes), so a new
  connection is a full handshake everywhere; server-side session tickets are off where
  the peer has a switch. Each proxy writes one log line per connection (TCP) or
  request (HTTP) to a file, as ours writes its audit record.
- HTTP-mode peers pool their mTLS connections (HAProxy `http-reuse always`, nginx
  upstream `keepalive 64`); TCP-mode pairs open one mTLS connection per client connection.
- Rows: wrk `-t1` (keep-alive: {s.ka_conns} connections; `Connection: close`:
  {s.close_conns}; 1 MiB: {s.mib_conns}), each after an unmeasured {WARMUP_S:g} s run of the
  same load (pools and caches filled), p50/p99 from wrk's latency histogram; the bulk
  stream is one GET read by a Python client; handshakes are `openssl s_time -new` against
  the server-side proxy, divided by the measured wall time; CPU per request is the
  proxies' utime+stime from /proc/PID/stat across the wrk run divided by requests
  completed; memory is the summed PSS (/proc/PID/smaps_rollup) of every proxy process
  after {s.idle_conns} connections each made one keep-alive request and stay idle
  (fresh processes: this workload runs first), then the same with 10,000 connections
  (full runs only, and no more than the file limit allows: two sockets per connection in
  each proxy process).
- MCP tools/call: wrk POSTs one JSON-RPC `tools/call` (MCP 2025-06-18 headers) to the
  backend's `/mcp`, which answers a JSON-RPC result. Ours goes through a second pair of
  listeners (`protocol = "mcp"` route and inbound listener, `tools = ["read_*"]`) that
  parse and judge every call; the peers relay the same bytes as plain HTTP. The MCP
  target compares ours' CPU per call with ours' CPU per plain keep-alive GET.
- Start-up: spawn of the server-side process to the client side accepting (port open),
  both sides started one after the other; for ours also `agent-proxy --help` and
  `agent-proxy run` with a one-listener config until its "listening" log line (best of 3).
- Round-robin: for each repetition, each contender is started fresh, runs every
  workload, and is stopped; medians over repetitions. Before the measurements, each
  contender is started twice more with an impostor SVID (same CA, SPIFFE ID
  `spiffe://bench.example/agent/impostor`) on one side and one request is tried: the
  "impostor" columns above show that each claimed check really refuses.
- TLS libraries differ: the peers, wrk and `s_time` use Debian's OpenSSL 3.0, whose
  full handshakes are known to be several times costlier than 1.1.1's or 3.2+'s; ours
  uses the OpenSSL bundled in the pyOpenSSL/cryptography wheel (see Machine).
  `s_time` itself spends about a millisecond of CPU per handshake on the load CPU, so
  the handshake row cannot show much beyond ~800/s for anyone.
- Load during the run (1/5/15-min load average): start {loads[0]}, end {loads[1]}. Other
  processes on this machine (e.g. test suites) add noise; compare ratios, not absolutes.

## Problems

{problems_list(table, contenders, notes)}

## Machine

{chr(10).join(machine)}

## Exact commands

{chr(10).join(commands)}

### Configuration files

{chr(10).join(configs)}"""
    text = text.replace(str(run.root), "$WORK")
    tmp = out_dir / f"{stem}.md.tmp"
    tmp.write_text(text)
    tmp.replace(out_dir / f"{stem}.md")
    return ratio_table + "\n\n" + targets_table(table, contenders)
