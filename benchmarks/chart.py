"""A PNG beside the Markdown table: one small panel per workload row, one bar
per contender, the bar length being the ratio to the best peer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.contenders import Contender
from benchmarks.report import Cell, fmt_value
from benchmarks.workloads import ROWS


def write_chart(
    table: dict[str, dict[str, Cell]], contenders: Sequence[Contender], path: Path, title: str
) -> str | None:
    """Draw the chart; returns why not when matplotlib is missing (the report says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a benchmark box
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"

    cols = 2
    rows = (len(ROWS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.3 * rows), squeeze=False)
    labels = [c.label for c in contenders]
    colors = [
        "#d62728" if c.is_ours else ("#7f7f7f" if not c.is_peer else "#1f77b4") for c in contenders
    ]
    for ax, row in zip(axes.flat, ROWS, strict=False):
        cells = [table[row.key][c.key] for c in contenders]
        ratios = [cell.ratio if cell.ratio is not None else 0.0 for cell in cells]
        ys = range(len(contenders))
        ax.barh(ys, ratios, color=colors)
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        better = "higher" if row.higher_is_better else "lower"
        ax.set_title(f"{row.title} ({row.unit}; {better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        right = max([*ratios, 1.0]) * 1.45
        ax.set_xlim(0, right)
        for y, cell in zip(ys, cells, strict=True):
            if cell.value is None:
                text = cell.text if len(cell.text) < 30 else cell.text[:29] + "…"
            else:
                text = (
                    f"{cell.ratio:.2f}x ({fmt_value(row, cell.value)})"
                    if cell.ratio
                    else (fmt_value(row, cell.value))
                )
            ax.text(right * 0.01 + (cell.ratio or 0), y, text, va="center", fontsize=7)
    for ax in list(axes.flat)[len(ROWS) :]:
        ax.axis("off")
    fig.suptitle(
        f"{title}: ratio to the best peer (dashed line); red = ours, blue = peers, grey = direct",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
