"""Turn raw samples into the ratio table and the Markdown report.

Each cell is the median over repetitions, shown as a ratio to the best
*peer* for that row (stunnel, HAProxy, nginx; never ours or direct), with the
absolute number beside it. The ratio is always ``value / best peer``, so for
rows where lower is better (latency, CPU, memory) a ratio above 1 is worse.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.contenders import Contender
from benchmarks.workloads import ROW_BY_KEY, ROWS, Row, Sample

Results = dict[str, dict[str, list[Sample]]]  # contender key -> row key -> one per rep


@dataclass(frozen=True)
class Cell:
    value: float | None  # median of the successful repetitions
    ratio: float | None
    text: str  # what the table shows
    problems: tuple[str, ...]  # errors and notes, for the list under the table


def fmt_value(row: Row, value: float) -> str:
    return f"{value:,.{row.decimals}f}"


def _median_cell(row: Row, samples: Sequence[Sample]) -> tuple[float | None, list[str]]:
    values = [s.value for s in samples if s.value is not None]
    problems = [s.error for s in samples if s.error] + [s.note for s in samples if s.note]
    return (statistics.median(values) if values else None), problems


def summarize(results: Results, contenders: Sequence[Contender]) -> dict[str, dict[str, Cell]]:
    table: dict[str, dict[str, Cell]] = {}
    for row in ROWS:
        medians = {
            c.key: _median_cell(row, results.get(c.key, {}).get(row.key, [])) for c in contenders
        }
        peer_values = [medians[c.key][0] for c in contenders if c.is_peer and medians[c.key][0]]
        best = None
        if peer_values:
            best = max(peer_values) if row.higher_is_better else min(peer_values)  # type: ignore[type-var]
        cells: dict[str, Cell] = {}
        for c in contenders:
            value, problems = medians[c.key]
            samples = results.get(c.key, {}).get(row.key, [])
            if value is None:
                first = problems[0] if problems else "not measured"
                cells[c.key] = Cell(None, None, _short(first), tuple(problems))
                continue
            ratio = value / best if best else None
            text = fmt_value(row, value)
            if ratio is not None:
                text = f"**{ratio:.2f}x** ({text})"
            failed = sum(1 for s in samples if s.value is None)
            if failed:
                text += f" ⚠ {failed}/{len(samples)} reps failed"
            elif any(s.note for s in samples):
                text += " ⚠"
            cells[c.key] = Cell(value, ratio, text, tuple(problems))
        table[row.key] = cells
    return table


def _short(text: str, limit: int = 48) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_table(table: dict[str, dict[str, Cell]], contenders: Sequence[Contender]) -> str:
    head = "| workload | " + " | ".join(c.label for c in contenders) + " |"
    sep = "|---|" + "---|" * len(contenders)
    lines = [head, sep]
    for row in ROWS:
        arrow = "higher is better" if row.higher_is_better else "lower is better"
        title = f"{row.title} ({row.unit}, {arrow})"
        cells = " | ".join(table[row.key][c.key].text for c in contenders)
        lines.append(f"| {title} | {cells} |")
    return "\n".join(lines)


def problems_list(
    table: dict[str, dict[str, Cell]], contenders: Sequence[Contender], notes: Sequence[str]
) -> str:
    out = []
    for row in ROWS:
        for c in contenders:
            seen: list[str] = []
            for p in table[row.key][c.key].problems:
                if p not in seen and not p.startswith("n/a"):
                    seen.append(p)
            out += [f"- {c.label}, {row.title}: {' '.join(p.split())}" for p in seen]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) if out else "- none"


L4_PEERS = ("stunnel", "haproxy-tcp", "nginx-stream")


@dataclass(frozen=True)
class TargetSpec:
    text: str
    row: str
    ours: str
    # Compare with: None = the best peer; a key = that contender; a tuple = the
    # best of those contenders; "absolute" = the value itself, no ratio.
    versus: str | tuple[str, ...] | None
    at_least: float | None = None  # ratio (or value) must be >= this
    at_most: float | None = None  # ratio (or value) must be <= this
    versus_row: str | None = None  # compare with another row of ``versus``


# Issue 11's targets (ratios to the named peer in the same run) and issue
# 12's start-up targets (absolute seconds on this machine).
TARGETS: tuple[TargetSpec, ...] = (
    TargetSpec("TCP keep-alive req/s ≥ 0.55x best L4 peer", "ka_rps", "ours-tcp", L4_PEERS,
               at_least=0.55),
    TargetSpec("TCP proxy CPU per keep-alive request ≤ 1.7x HAProxy TCP", "cpu_ka", "ours-tcp",
               "haproxy-tcp", at_most=1.7),
    TargetSpec("bulk MB/s ≥ 0.75x best peer", "bulk_mbps", "ours-tcp", None, at_least=0.75),
    TargetSpec("new connection per request, TCP, ≥ 0.7x best L4 peer", "close_rps", "ours-tcp",
               L4_PEERS, at_least=0.7),
    TargetSpec("full handshakes/s ≥ 0.75x best peer", "hs_rate", "ours-tcp", None, at_least=0.75),
    TargetSpec("PSS with 1,000 idle connections ≤ 1.8x best peer", "mem_idle", "ours-tcp", None,
               at_most=1.8),
    TargetSpec("HTTP keep-alive req/s ≥ 0.5x HAProxy HTTP", "ka_rps", "ours-http",
               "haproxy-http", at_least=0.5),
    TargetSpec("HTTP new agent connection per request ≥ 0.45x HAProxy HTTP", "close_rps",
               "ours-http", "haproxy-http", at_least=0.45),
    TargetSpec("MCP tools/call CPU ≤ 1.3x plain HTTP through the same pair", "cpu_mcp",
               "ours-http", "ours-http", at_most=1.3, versus_row="cpu_ka"),
    TargetSpec("`agent-proxy --help` under 0.3 s", "help_s", "ours-http", "absolute",
               at_most=0.3),
    TargetSpec("`agent-proxy run` ready under 0.6 s (small config)", "ready_s", "ours-http",
               "absolute", at_most=0.6),
)  # fmt: skip


def _against(
    t: TargetSpec, table: dict[str, dict[str, Cell]], labels: dict[str, str]
) -> tuple[str, float | None]:
    """What the target compares with: (label, value or None)."""
    row = ROW_BY_KEY[t.row]
    cells = table[t.versus_row or t.row]
    if t.versus is None:
        ours = table[t.row][t.ours]
        best = ours.value / ours.ratio if ours.value and ours.ratio else None
        return "best peer", best
    if isinstance(t.versus, tuple):
        values = [cells[k].value for k in t.versus if k in cells and cells[k].value]
        best = (max if row.higher_is_better else min)(values) if values else None  # type: ignore[type-var]
        return "best of " + ", ".join(labels.get(k, k) for k in t.versus), best
    other = cells[t.versus]
    label = labels[t.versus] + (f" ({ROW_BY_KEY[t.versus_row].title})" if t.versus_row else "")
    return label, other.value


def targets_table(table: dict[str, dict[str, Cell]], contenders: Sequence[Contender]) -> str:
    labels = {c.key: c.label for c in contenders}
    lines = ["| target | ours | against | ratio | met? |", "|---|---|---|---|---|"]
    for t in TARGETS:
        keys = t.versus if isinstance(t.versus, tuple) else (t.versus,)
        named = [k for k in keys if k not in (None, "absolute")]
        if t.ours not in labels or any(k not in labels for k in named):
            continue  # a run limited with --only
        row = ROW_BY_KEY[t.row]
        ours = table[t.row][t.ours]
        if t.versus == "absolute":
            against_label, ratio = "absolute", ours.value
        else:
            against_label, other = _against(t, table, labels)
            ratio = ours.value / other if ours.value and other else None
        if ratio is None:
            verdict, ratio_text = "not measured", ours.text if ours.value is None else "-"
        else:
            ok = (t.at_least is None or ratio >= t.at_least) and (
                t.at_most is None or ratio <= t.at_most
            )
            verdict = "met" if ok else "**not met**"
            ratio_text = f"{ratio:.2f} s" if t.versus == "absolute" else f"{ratio:.2f}x"
        ours_text = fmt_value(row, ours.value) if ours.value is not None else "-"
        lines.append(
            f"| {t.text} | {labels[t.ours]}: {ours_text} {row.unit} | {against_label} "
            f"| {ratio_text} | {verdict} |"
        )
    return "\n".join(lines)


def identity_table(contenders: Sequence[Contender], selftest: dict[str, tuple[str, str]]) -> str:
    lines = [
        "| contender | mode | how it checks the peer's identity | impostor client | "
        "impostor server | notes |",
        "|---|---|---|---|---|---|",
    ]
    for c in contenders:
        client, server = selftest.get(c.key, ("not run", "not run"))
        if c.mode == "direct":
            client = server = "n/a"
        lines.append(
            f"| {c.label} | {c.mode} | {c.identity} | {_short(client, 60)} "
            f"| {_short(server, 60)} | {c.notes} |"
        )
    return "\n".join(lines)
