"""The demo's audit summary: one aligned row per decision record (pure)."""

from __future__ import annotations

import textwrap
from typing import Any

__all__ = ["SUMMARY_HEADS", "summary_rows", "summary_table"]

SUMMARY_HEADS = ("sidecar", "event", "decision", "reason", "peer", "request/target", "rule")


def summary_rows(sidecar: str, records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per decision record; a request row names the request, a
    connection row the target it was for (never its event a second time)."""
    rows: list[tuple[str, ...]] = []
    for r in records:
        if r["event"] == "connection.close" or "decision" not in r:
            continue
        request = f"{r.get('method', '')} {r.get('path', '')}".strip()
        rows.append(
            (
                sidecar,
                str(r["event"]),
                str(r["decision"]),
                str(r["reason"]),
                str(r.get("peer_id") or "-"),
                str(request or r.get("target") or "-"),
                str(r.get("rule") or "-"),
            )
        )
    return rows


def summary_table(rows: list[tuple[str, ...]], width: int) -> list[str]:
    """The rows as aligned columns in ``width``: all seven on one line when
    they fit; otherwise the decision (sidecar, event, decision, reason) on
    one line and who and what (peer, request or target, rule) beneath it:
    aligned, or on one line, or one field a line, wrapped, whichever fits."""
    indent, under = "   ", "      "

    def aligned(cells: list[tuple[str, ...]], prefix: str) -> list[str] | None:
        widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
        if len(prefix) + sum(widths) + 2 * (len(widths) - 1) > width:
            return None
        return [
            (prefix + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
            for row in cells
        ]

    whole = aligned([SUMMARY_HEADS, *rows], indent)
    if whole is not None:
        return whole
    firsts = aligned([r[:4] for r in rows], indent) or [indent + " ".join(r[:4]) for r in rows]
    seconds = aligned([r[4:] for r in rows], under)
    out: list[str] = []
    for i, row in enumerate(rows):
        out += textwrap.wrap(firsts[i], width, subsequent_indent=under) or [firsts[i]]
        if seconds is not None:
            out.append(seconds[i])
            continue
        labelled = list(zip(("peer", "request/target", "rule"), row[4:], strict=True))
        one_line = under + "  ".join(f"{name}={value}" for name, value in labelled)
        if len(one_line) <= width:
            out.append(one_line)
            continue
        for name, value in labelled:
            out += textwrap.wrap(
                f"{name}: {value}", width, initial_indent=under, subsequent_indent=under + "  "
            )
    return out
