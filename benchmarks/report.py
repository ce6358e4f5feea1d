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


@dataclass(frozen=True)
class TargetSpec:
    text: str
    row: str
    ours: str
    # Compare with this contender's cell; None means the best peer.
    versus: str | None
    at_least: float | None = None  # ratio must be >= this
    at_most: float | None = None  # ratio must be <= this


TARGETS: tuple[TargetSpec, ...] = (
    TargetSpec("TCP keep-alive ≥ 0.7x best peer req/s", "ka_rps", "ours-tcp", None, at_least=0.7),
    TargetSpec(
        "HTTP mode, new agent connection per request ≥ 1.0x HAProxy HTTP mode",
        "close_rps",
        "ours-http",
        "haproxy-http",
        at_least=1.0,
    ),
    TargetSpec("bulk stream ≥ 1.0x best peer MB/s", "bulk_mbps", "ours-tcp", None, at_least=1.0),
    TargetSpec("handshakes/s ≥ 0.9x best peer", "hs_rate", "ours-tcp", None, at_least=0.9),
    TargetSpec(
        "memory with idle connections ≤ 2x best peer", "mem_idle", "ours-tcp", None, at_most=2.0
    ),
)


def targets_table(table: dict[str, dict[str, Cell]], contenders: Sequence[Contender]) -> str:
    labels = {c.key: c.label for c in contenders}
    lines = ["| target | ours | against | ratio | met? |", "|---|---|---|---|---|"]
    for t in TARGETS:
        if t.ours not in labels or (t.versus is not None and t.versus not in labels):
            continue  # a run limited with --only
        row = ROW_BY_KEY[t.row]
        ours = table[t.row][t.ours]
        if t.versus is None:
            against_label, ratio = "best peer", ours.ratio
        else:
            other = table[t.row][t.versus]
            against_label = labels[t.versus]
            ratio = ours.value / other.value if ours.value and other.value else None
        if ratio is None:
            verdict, ratio_text = "not measured", ours.text if ours.value is None else "-"
        else:
            ok = (t.at_least is None or ratio >= t.at_least) and (
                t.at_most is None or ratio <= t.at_most
            )
            verdict, ratio_text = ("yes" if ok else "**no**"), f"{ratio:.2f}x"
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
