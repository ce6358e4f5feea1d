"""One benchmark session: the shared state, and how a contender is deployed,
measured and self-tested.

Round-robin: for each repetition, each contender in turn is started fresh,
driven through every workload, and stopped, so only one pair runs at a time
and slow drift of the machine spreads over all contenders alike. A contender
that cannot run, or that fails, gets the reason in its cells and the run goes on.
"""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.contenders import Contender, Context, Deployment
from benchmarks.fixtures import CLIENT_ID, Backend, Identities, Identity, agent_proxy_argv
from benchmarks.harness import BenchError, Pinning, Proc, free_port
from benchmarks.report import Results
from benchmarks.workloads import (
    ROWS,
    WORKLOADS,
    Env,
    Recorder,
    Sample,
    Settings,
    Target,
    Workload,
    probe,
)


@dataclass
class Run:
    settings: Settings
    reps: int
    pinning: Pinning
    ids: Identities
    backend: Backend
    root: Path
    recorder: Recorder = field(default_factory=Recorder)
    results: Results = field(default_factory=dict)
    start_commands: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # listed under "Problems"
    # contender key -> (impostor client outcome, impostor server outcome)
    selftest: dict[str, tuple[str, str]] = field(default_factory=dict)
    configs: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self, key: str, row: str, sample: Sample) -> None:
        self.results.setdefault(key, {}).setdefault(row, []).append(sample)

    def had_errors(self) -> bool:
        samples = (s for rows in self.results.values() for reps in rows.values() for s in reps)
        return bool(self.notes) or any(s.error and s.error.startswith("error") for s in samples)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def deployed(
    run: Run, c: Contender, d: Path, client: Identity | None = None, server: Identity | None = None
) -> Iterator[tuple[Deployment, list[Proc]]]:
    """Start a contender's processes (server side first), wait until each is
    ready, and stop them all on the way out, whatever happened."""
    d.mkdir()
    ctx = Context(
        d, run.ids, run.backend.port, run.pinning,
        client_presents=client or run.ids.client, server_presents=server or run.ids.server,
    )  # fmt: skip
    procs: list[Proc] = []
    try:
        dep = c.build(ctx)
        began = time.monotonic()
        for spec in dep.procs:
            procs.append(Proc(spec, d))
            procs[-1].wait_ready()
        if procs:
            dep.startup_s = time.monotonic() - began
        yield dep, procs
    finally:
        for p in reversed(procs):
            p.stop()


def run_contender(run: Run, c: Contender, rep: int, unavailable: str | None) -> None:
    if unavailable is not None:
        for row in ROWS:
            run.record(c.key, row.key, Sample(None, error=unavailable))
        log(f"[rep {rep + 1}] {c.label}: {unavailable}")
        return
    done_rows: set[str] = set()
    d = run.root / f"{c.key}-rep{rep + 1}"
    try:
        with deployed(run, c, d) as (dep, procs):
            run.start_commands.setdefault(c.key, [p.spec.command() for p in procs])
            run.configs.setdefault(c.key, dep.configs)
            target = Target(
                client_port=dep.client_port,
                inbound_port=dep.inbound_port,
                pids=lambda: [pid for p in procs for pid in p.pids()],
                has_proxies=bool(procs),
                mcp_port=dep.mcp_port,
            )
            startup = (Sample(dep.startup_s) if dep.startup_s is not None
                       else Sample(None, error="n/a (no proxy)"))  # fmt: skip
            run.record(c.key, "startup", startup)
            done_rows.add("startup")
            for row_key, sample in ours_startup(run, c).items():
                run.record(c.key, row_key, sample)
                done_rows.add(row_key)
            for name, workload, rows in WORKLOADS:
                out = _one_workload(run, workload, target, procs, rows)
                for row_key, sample in out.items():
                    run.record(c.key, row_key, sample)
                    done_rows.add(row_key)
                shown = ", ".join(
                    f"{r}={s.value:,.1f}" if s.value is not None else f"{r}: {s.error}"
                    for r, s in out.items()
                )
                log(f"[rep {rep + 1}] {c.label} {name}: {shown}")
    except (BenchError, OSError) as exc:
        log(f"[rep {rep + 1}] {c.label}: error: {exc}")
        for row in ROWS:
            if row.key not in done_rows:
                run.record(c.key, row.key, Sample(None, error=f"error: {exc}"))
    if c.is_ours:
        health = ours_health(d)
        if health:
            run.notes.append(f"{c.label}, rep {rep + 1}: {health}")
            log(f"[rep {rep + 1}] {c.label}: {health}")


def ours_startup(run: Run, c: Contender) -> dict[str, Sample]:
    """Issue 12's start-up targets, for our HTTP sidecar only: ``--help``, and
    ``run`` with a small config from spawn to its "listening" log line."""
    if not (c.is_ours and c.mode == "http"):
        return {k: Sample(None, error="n/a (ours only)") for k in ("help_s", "ready_s")}
    argv = agent_proxy_argv()
    helps, readies = [], []
    for i in range(3):
        began = time.monotonic()
        subprocess.run([*argv, "--help"], capture_output=True, check=False, timeout=60)
        helps.append(time.monotonic() - began)
        readies.append(_time_to_listening(run, argv, i))
    return {"help_s": Sample(min(helps)), "ready_s": Sample(min(readies))}


def _time_to_listening(run: Run, argv: list[str], i: int) -> float:
    ids, d = run.ids.server, run.root / f"startup-{i}-{time.monotonic_ns()}"
    d.mkdir()
    config = d / "small.toml"
    config.write_text(f"""log_level = "info"

[identity]
source = "files"
cert = "{ids.cert}"
key = "{ids.key}"
bundle = "{ids.bundle}"

[admin]
enabled = false

[audit]
path = "{d / "audit.jsonl"}"

[[inbound]]
name = "startup"
protocol = "http"
listen = "127.0.0.1:{free_port()}"
target = "127.0.0.1:{run.backend.port}"

[[inbound.rules]]
peers = ["{CLIENT_ID}"]
methods = ["GET"]
paths = ["/**"]
""")
    began = time.monotonic()
    proc = subprocess.Popen([*argv, "run", "--config", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if b"listening" in line:
                return time.monotonic() - began
        raise BenchError(f"agent-proxy run exited {proc.wait()} before listening")
    finally:
        proc.kill()
        proc.wait()


def ours_health(d: Path) -> str | None:
    """Our processes under load should log no errors and audit no internal_error;
    count both so a regression shows up in the report, not only in a temp dir."""
    internal = errors = 0
    events: collections.Counter[str] = collections.Counter()
    for path in d.glob("*.jsonl"):
        with open(path, errors="replace") as f:
            internal += sum(1 for line in f if '"reason":"internal_error"' in line)
    for path in d.glob("*.stderr"):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("level") in ("error", "critical"):
                    errors += 1
                    events[str(rec.get("event"))] += 1
    if not internal and not errors:
        return None
    top = ", ".join(f"{event!r} x{n}" for event, n in events.most_common(3))
    return f"{internal} audit records with reason internal_error; {errors} error log lines" + (
        f" ({top})" if top else ""
    )


def _one_workload(
    run: Run, workload: Workload, target: Target, procs: list[Proc], rows: tuple[str, ...]
) -> dict[str, Sample]:
    try:
        for p in procs:
            p.check_alive()
        return workload(target, Env(run.settings, run.ids, run.pinning, run.recorder))
    except (BenchError, OSError) as exc:
        # A proxy that died mid-workload explains the failure better.
        reason = str(exc)
        for p in procs:
            if p.popen.poll() is not None:
                reason = f"{reason}; {p.spec.name} exited {p.popen.returncode}: {p.tail(3)}"
        return {r: Sample(None, error=f"error: {reason}") for r in rows}


def identity_selftest(run: Run, c: Contender) -> tuple[str, str]:
    """Present the impostor SVID (same CA, wrong SPIFFE ID) on one side at a
    time and try one request: proof that each identity check in the table is
    real. Returns what happened with an impostor client and an impostor server."""
    outcomes = []
    for role in ("client", "server"):
        kwargs = {role: run.ids.impostor}
        try:
            with deployed(run, c, run.root / f"{c.key}-impostor-{role}", **kwargs) as (dep, _):
                outcomes.append(probe(dep.client_port))
        except (BenchError, OSError) as exc:
            outcomes.append(f"error: {exc}")
    log(f"identity self-test {c.label}: impostor client {outcomes[0]}; server {outcomes[1]}")
    return outcomes[0], outcomes[1]


def selftests(run: Run, contenders: Sequence[Contender], available: dict[str, str | None]) -> None:
    for c in contenders:
        if c.mode == "direct":
            continue
        if available[c.key] is not None:
            run.selftest[c.key] = (available[c.key] or "", available[c.key] or "")
        else:
            run.selftest[c.key] = identity_selftest(run, c)
