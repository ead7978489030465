"""The answer at a glance, without Textual: the summary strip's lines and the K×K overlap grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlsub_tui.formatting import count, pct, ratio
from rlsub_tui.selection import OverlapFigure, SelectedStats

MEASURES = ["o1", "jaccard", "lift"]
MEASURE_TITLES = {
    "o1": "o1 = |A∩B|/|A| (row A, column B)",
    "jaccard": "Jaccard |A∩B|/|A∪B|",
    "lift": "lift of o1 over chance (row A, column B)",
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
        lines.append(f"all {len(sel.runs)} runs: not in the records for more than 15 runs")
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
                lift = p["jaccard"] / p["jaccard_random"] if p["jaccard_random"] else math.nan
                row.append(GridCell(p["jaccard"], p["jaccard_random"], lift))
            else:
                lift = o1 / o1_rnd if o1_rnd else math.nan
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


def overlap_chart(sel: SelectedStats, metric: str = "o1"):
    """Per pair of chosen runs (numbered as in the run list): observed, chance and lift = observed / chance."""
    from rlsub_tui.explore import ChartData

    title = "Jaccard |A∩B|/|A∪B|" if metric == "jaccard" else "o1 = |A∩B|/|A|"
    if len(sel.runs) < 2:
        return ChartData("overlap", title, "pair", metric, [], {}, message="overlap needs two or more chosen runs: press r")
    ticks, observed, chance = [], [], []
    for a, b, p in sel.pairs():
        ticks.append(f"{a + 1}·{b + 1}")
        key = "jaccard" if metric == "jaccard" else "o1"
        observed.append(p[key])
        chance.append(p[f"{key}_random"])
    lift = [o / c if c and not math.isnan(o) else math.nan for o, c in zip(observed, chance)]
    message = None
    if not sel.numel:
        message = "waiting for results…"
    elif all(math.isnan(x) for x in observed):
        message = "undefined: no chosen run updated a parameter here (pick a larger node or press r)"
    return ChartData("overlap", f"lift of {title} over chance, per run pair i·j", "pair", metric,
                     list(range(len(ticks))), {"observed": observed, "chance": chance, "lift": lift}, ticks,
                     message=message)


def agreement_chart(sel: SelectedStats):
    """Percent of parameters updated by exactly j of the chosen runs, observed and by chance."""
    from rlsub_tui.explore import CHART_TITLES, ChartData

    title = CHART_TITLES["agreement"] + " (% of params)"
    if not sel.numel:
        return ChartData("agreement", title, "j", "% of params", [], {}, message="waiting for results…")
    observed = sel.agreement()
    if observed is None:
        return ChartData("agreement", title, "j", "% of params", [], {},
                         message="a subset's agreement is not recorded beyond 15 runs: press r and choose all")
    chance = sel.agreement_chance()
    return ChartData("agreement", title, "j", "% of params", list(range(len(sel.runs) + 1)),
                     {"observed": [100 * float(c) / sel.numel for c in observed],
                      "chance": [100 * float(c) / sel.numel for c in chance]})
