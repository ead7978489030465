"""The answer at a glance, without Textual: the summary strip's lines and the K×K overlap grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlsub_tui.records import overlap
from rlsub_tui.summaries.selection import OverlapFigure, SelectedStats
from rlsub_tui.util.formatting import count, pct, ratio

MEASURES = ["o1", "jaccard", "lift"]
MEASURE_TITLES = {
    "o1": "o1 = |A∩B|/|A|, row A, column B",
    "jaccard": "Jaccard = |A∩B|/|A∪B|",
    "lift": "o1 / chance, row A, column B",
}


def _lift(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:.0f}×"


def _figure_line(name: str, f: OverlapFigure, digits: int = 3) -> str:
    if math.isnan(f.observed):
        return f"{name} undefined: no chosen run updated a parameter here"
    return f"{name} {ratio(f.observed, digits)}  chance {ratio(f.chance, digits)}  lift {_lift(f.lift)}"


def sparsity_line(sel: SelectedStats, width: int = 48) -> str:
    """Each chosen run's sparsity, numbered as in the run list: 'sparsity % 1:91.2 2:91.7'."""
    cells = " ".join(f"{i + 1}:{100 * sel.sparsity(i):.1f}" if sel.numel else f"{i + 1}:–" for i in sel.runs)
    of = f"{len(sel.runs)}/{sel.stats.k} runs"
    for line in (f"sparsity % ({of}) {cells}", f"sparsity % {cells}", f"sp% {cells}"):
        if len(line) <= width:
            return line
    return line


def summary_lines(sel: SelectedStats, width: int = 48) -> list[str]:
    """One line each: per-run sparsity (numbered: which runs are chosen), mean o1 and Jaccard with chance and
    lift, consensus with its chance, sign agreement."""
    lines = [sparsity_line(sel, width)]
    if not sel.numel:
        return lines + ["waiting for results…"]
    if len(sel.runs) < 2:
        return lines + ["overlap needs two or more chosen runs: press r"]
    lines.append(_figure_line("mean o1", sel.one_sided()))
    lines.append(_figure_line("Jaccard", sel.jaccard()))
    cons = sel.consensus()
    if math.isnan(cons.observed):
        lines.append(f"all {len(sel.runs)} runs: recorded for all runs, or subsets of up to 10 runs")
    else:
        lines.append(f"all {len(sel.runs)} runs {pct(cons.observed, 2)}  chance {pct(cons.chance, 2)}  "
                     f"lift {_lift(cons.lift)}")
    lines.append(sign_line(sel))
    return lines


def sign_line(sel: SelectedStats) -> str:
    if not sel.all_runs:
        return "same sign: recorded for all runs together only"
    s = sel.stats
    if not s.multi:
        return "same sign: no parameter updated by two or more runs"
    return f"same sign {pct(s.sign_agreement())} of {count(s.multi)} updated by ≥2 runs"


# ------------------------------------------------------------------------------------------------------
# The K×K grid


@dataclass
class GridCell:
    value: float  # the measure shown (NaN: undefined, or the diagonal)
    chance: float
    lift: float  # observed over chance, of o1 for o1 and lift, of Jaccard for Jaccard


def overlap_grid(sel: SelectedStats, measure: str) -> list[list[GridCell]]:
    """Rows and columns are the chosen runs; cell (A, B) holds the measure of row run A against column run B."""
    st = sel.stats
    grid = []
    for a in sel.runs:
        row = []
        for b in sel.runs:
            if a == b:
                row.append(GridCell(math.nan, math.nan, math.nan))
                continue
            p = st.pair(min(a, b), max(a, b))
            o1, o1_rnd = (p["o1"], p["o1_random"]) if a < b else (p["o2"], p["o2_random"])
            if measure == "jaccard":
                lift = overlap.lift(p["jaccard"], p["jaccard_random"])
                row.append(GridCell(p["jaccard"], p["jaccard_random"], lift))
            else:
                lift = overlap.lift(o1, o1_rnd)
                row.append(GridCell(lift if measure == "lift" else o1, o1_rnd, lift))
        grid.append(row)
    return grid


def grid_rows(sel: SelectedStats, labels: list[str], measure: str) -> tuple[list[str], list[list]]:
    """The grid as CSV rows: one per ordered pair of chosen runs."""
    header = ["run_a", "run_b", "measure", "value", "chance", "lift"]
    rows = []
    for a, cells in zip(sel.runs, overlap_grid(sel, measure)):
        for b, c in zip(sel.runs, cells):
            if a != b:
                chance = 1.0 if measure == "lift" else c.chance
                rows.append([labels[a], labels[b], measure, c.value, chance, c.lift])
    return header, rows


# ------------------------------------------------------------------------------------------------------
# Charts over the chosen runs


# ------------------------------------------------------------------------------------------------------
# Charts that follow the focus: a node inside one layer is shown against its peers in every layer


# ------------------------------------------------------------------------------------------------------
# Run groups: within against between


def groups_line(sel: SelectedStats, groups) -> str | None:
    """Mean o1 over pairs inside a group and over pairs across groups (chosen runs only); None without groups."""
    from rlsub_tui.summaries.groups import within_between

    if not groups or not sel.numel:
        return None
    within, between = within_between(sel.stats, groups, sel.runs)
    if not within.pairs or not between.pairs:
        return f"groups: {'no pair inside a group' if not within.pairs else 'one group chosen'} (b: blocks)"
    return (f"o1 within {ratio(within.o1, 3).lstrip('0')} ({_lift(within.lift('o1'))}), "
            f"between {ratio(between.o1, 3).lstrip('0')} ({_lift(between.lift('o1'))})")


def block_grid(sel: SelectedStats, groups, measure: str) -> tuple[list[str], list[list[GridCell]]]:
    """Groups × groups: each cell the mean measure over the chosen run pairs between the two (within on the
    diagonal); lift = mean observed over mean chance."""
    from rlsub_tui.summaries.groups import blocks

    key = "jaccard" if measure == "jaccard" else "o1"
    grid = []
    for row in blocks(sel.stats, groups, sel.runs):
        cells = []
        for f in row:
            obs, rnd = getattr(f, key), getattr(f, f"{key}_random")
            lift = f.lift(key)
            cells.append(GridCell(lift if measure == "lift" else obs, rnd, lift) if f.pairs
                         else GridCell(math.nan, math.nan, math.nan))
        grid.append(cells)
    return [f"{g.name} ({len(g.runs)})" for g in groups], grid


def block_rows(sel: SelectedStats, groups, measure: str) -> tuple[list[str], list[list]]:
    from rlsub_tui.summaries.groups import blocks

    header = ["group_a", "group_b", "pairs", "measure", "value", "chance", "lift"]
    names, grid = block_grid(sel, groups, measure)
    figs = blocks(sel.stats, groups, sel.runs)
    rows = []
    for ga, cells, frow in zip(groups, grid, figs):
        for gb, c, f in zip(groups, cells, frow):
            rows.append([ga.name, gb.name, f.pairs, measure, c.value, 1.0 if measure == "lift" else c.chance, c.lift])
    return header, rows


# ------------------------------------------------------------------------------------------------------
# One tensor, looked at closely (matrix_detail)


def detail_rows(detail, labels: list[str], view: str) -> tuple[list[str], list[list]]:
    """CSV of a detail view: the Δ histogram's counts per bin, or the mask map's counts per cell."""
    names = [labels[r] for r in detail.runs]
    if view == "delta":
        header = ["log2_abs_delta"] + names
        rows = [["zero"] + [int(z) for z in detail.zero]]
        rows += [[int(x)] + [int(c) for c in detail.log2_counts[:, i]] for i, x in enumerate(detail.log2_bins)]
        return header, rows
    header = ["cell_row", "cell_col", "params"] + [f"updated:{n}" for n in names] + ["updated_by_all_chosen"]
    rows = []
    for i in range(detail.cell_numel.shape[0]):
        for j in range(detail.cell_numel.shape[1]):
            rows.append([i, j, int(detail.cell_numel[i, j])] + [int(u[i, j]) for u in detail.updated]
                        + [int(detail.consensus[i, j])])
    return header, rows
