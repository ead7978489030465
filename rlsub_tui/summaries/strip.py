"""The answer at a glance, without Textual: the summary strip's lines and the K×K overlap grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlsub_tui.records import overlap
from rlsub_tui.summaries.selection import OverlapFigure, SelectedStats
from rlsub_tui.util.formatting import count, pct, ratio

MEASURES = ["o1", "jaccard", "lift", "lift_strat", "directions"]
MEASURE_TITLES = {
    "directions": "subspace overlap of the top-k left singular vectors (k: e90), row A, column B",
    "o1": "o1 = |A∩B|/|A|, row A, column B",
    "jaccard": "Jaccard = |A∩B|/|A∪B|",
    "lift": "o1 / pooled chance, row A, column B",
    "lift_strat": "o1 / stratified chance, row A, column B",
}
LIFT_MEASURES = ("lift", "lift_strat")  # grid measures whose cells show a lift (coloured by it)


def _lift(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:.0f}×"


STRAT_FIRST = 0.10  # the two lifts disagree by more than this share: the stratified one, the honest margin, leads


def strat_leads(pooled: float, strat: float) -> bool:
    """Whether the stratified lift should be shown first: the two disagree by more than STRAT_FIRST."""
    if math.isnan(pooled) or math.isnan(strat) or not strat:
        return False
    return abs(pooled / strat - 1) > STRAT_FIRST


def lifts_text(pooled: float, strat: float, sep: str = " · ") -> str:
    """Both lifts wherever a lift is shown: 'lift 1.79× · strat 1.13×' over the pooled and the stratified chance
    (science.md), the stratified first ('strat 1.13× · lift 1.79×') when they disagree by more than 10%."""
    parts = [f"lift {_lift(pooled)}", f"strat {_lift(strat)}"]
    return sep.join(parts[::-1] if strat_leads(pooled, strat) else parts)


def _short(x: float, digits: int) -> str:
    return ratio(x, digits).lstrip("0") if 0 <= x < 1 else ratio(x, digits)


def _figure_line(name: str, f: OverlapFigure, width: int, digits: int = 3) -> str:
    if math.isnan(f.observed):
        return f"{name} undefined: no chosen run updated a parameter here"
    full = f"{name} {ratio(f.observed, digits)}  chance {ratio(f.chance, digits)}  {lifts_text(f.lift, f.lift_strat)}"
    if len(full) <= width:
        return full
    return (f"{name} {_short(f.observed, digits)} chance {_short(f.chance, digits)} "
            f"{lifts_text(f.lift, f.lift_strat, ' ')}")


def sparsity_line(sel: SelectedStats, width: int = 48) -> str:
    """Each chosen run's sparsity, numbered as in the run list, with the dtype the runs were compared in:
    'sparsity in bf16 (2/2 runs) 1:91.2% 2:91.7%'."""
    cells = " ".join(f"{i + 1}:{pct(sel.sparsity(i))}" if sel.numel else f"{i + 1}:–" for i in sel.runs)
    of, dtype = f"{len(sel.runs)}/{sel.stats.k} runs", sel.compared_in()
    for line in (f"sparsity in {dtype} ({of}) {cells}", f"sparsity in {dtype} {cells}", f"sp {dtype} {cells}",
                 f"sp {cells}"):
        if len(line) <= width:
            return line
    return line


def true_update_line(sel: SelectedStats, width: int = 48) -> str | None:
    """For chosen runs stored finer than bf16: their true-update sparsity in the stored precision and the share
    of true updates bf16 hides, whatever the comparison dtype; None when every chosen run is bf16."""
    fine = sel.fine_runs
    if not fine:
        return None
    st = sel.stats
    true = " ".join(f"{i + 1}:{pct(st.true_sparsity(i))}" for i in fine)
    hidden = " ".join(f"{i + 1}:{pct(st.hidden_by_bf16(i))}" for i in fine)
    stored = sel.stored_in()
    hint = sel.compared_in() != stored  # the headline is in another dtype: say which key shows this one's
    other, short = (f"  (c: compare in {stored})", f"  (c: {stored})") if hint else ("", "")
    for line in (f"true sparsity in {stored} {true}  hidden by bf16 {hidden}{other}",
                 f"true sp in {stored} {true}  hid bf16 {hidden}{other}",
                 f"true sp {stored} {true}  hid bf16 {hidden}{short}",
                 f"true sp {stored} {true}  hid bf16 {hidden}", f"true sp {stored} {true}"):
        if len(line) <= width:
            return line
    return line


def summary_lines(sel: SelectedStats, width: int = 48) -> list[str]:
    """One line each: per-run sparsity (numbered: which runs are chosen) in its comparison dtype, the true-update
    sparsity of runs stored finer than bf16, mean o1 and Jaccard with chance and both lifts, consensus with its
    chance, sign agreement with its coin-flip chance."""
    lines = [sparsity_line(sel, width)]
    true = true_update_line(sel, width) if sel.numel else None
    if true is not None:
        lines.append(true)
    if not sel.numel:
        return lines + ["waiting for results…"]
    if len(sel.runs) < 2:
        return lines + ["overlap needs two or more chosen runs: press r"]
    lines.append(_figure_line("mean o1", sel.one_sided(), width))
    lines.append(_figure_line("Jaccard", sel.jaccard(), width))
    cons = sel.consensus()
    if math.isnan(cons.observed):
        lines.append(f"all {len(sel.runs)} runs: recorded for all runs, or subsets of up to 10 runs")
    else:
        line = (f"all {len(sel.runs)} runs {pct(cons.observed, 2)}  chance {pct(cons.chance, 2)}  "
                f"{lifts_text(cons.lift, cons.lift_strat)}")
        if len(line) > width:
            line = (f"all {len(sel.runs)} {pct(cons.observed, 2)} chance {pct(cons.chance, 2)} "
                    f"{lifts_text(cons.lift, cons.lift_strat, ' ')}")
        lines.append(line)
    lines.append(sign_line(sel))
    line = directions_line(sel)
    if line is not None:
        lines.append(line)
    return lines


SHORT_SCREEN = 30  # terminal rows below which the strip keeps its most telling lines, so the table keeps its rows


def telling_lines(lines: list[str], rows: int) -> list[str]:
    """The strip for a short screen: the sparsity line, the true-update line when there is one, the Jaccard line
    (its observed value, chance and both lifts) and the run groups' line, in that order; every line on a tall
    screen."""
    if rows >= SHORT_SCREEN or len(lines) <= 2:
        return lines
    telling = ("true sp", "Jaccard", "o1 within", "groups:", "waiting", "overlap needs")
    return [lines[0]] + [x for x in lines[1:] if x.startswith(telling)]


def directions_line(sel: SelectedStats) -> str | None:
    """The chosen runs' pairs' subspace overlap, left and right, at k = e90, with chance k/m, k/n (None when no
    subspace was computed here)."""
    figures = [sel.stats.subspaces.figure(side, "e90", runs=sel.runs) for side in ("left", "right")]
    if all(math.isnan(ov) for ov, _ in figures):
        return None
    (lo, lc), (ro, rc) = figures
    return (f"directions: left {_short(lo, 2)} (chance {_short(lc, 2)}), right {_short(ro, 2)} "
            f"(chance {_short(rc, 2)})")


def sign_line(sel: SelectedStats) -> str:
    if not sel.all_runs:
        return "same sign: recorded for all runs together only"
    s = sel.stats
    if not s.multi:
        return "same sign: no parameter updated by two or more runs"
    return (f"same sign {pct(s.sign_agreement())} (coin flips {pct(s.sign_agreement_chance())}) of "
            f"{count(s.multi)} updated by ≥2 runs")


# ------------------------------------------------------------------------------------------------------
# The K×K grid


@dataclass
class GridCell:
    value: float  # the measure shown (NaN: undefined, or the diagonal)
    chance: float  # the pooled chance of the observed overlap (o1, or Jaccard for Jaccard)
    lift: float  # observed over pooled chance, of o1 for o1 and the lifts, of Jaccard for Jaccard
    observed: float = math.nan  # o1, or Jaccard for Jaccard
    chance_strat: float = math.nan
    lift_strat: float = math.nan  # observed over the stratified chance

    def colour_lift(self, measure: str) -> float:
        """The lift the cell is coloured by: the stratified one in its mode, else the pooled one."""
        return self.lift_strat if measure == "lift_strat" else self.lift


def _cell(measure: str, observed: float, chance: float, strat: float) -> GridCell:
    lift, lift_strat = overlap.lift(observed, chance), overlap.lift(observed, strat)
    value = {"lift": lift, "lift_strat": lift_strat}.get(measure, observed)
    return GridCell(value, chance, lift, observed, strat, lift_strat)


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
            if measure == "directions":
                ov, ch = st.subspaces.pair(a, b, "left")
                row.append(GridCell(ov, ch, overlap.lift(ov, ch), ov))
                continue
            p = st.pair(min(a, b), max(a, b))
            if measure == "jaccard":
                row.append(_cell(measure, p["jaccard"], p["jaccard_random"], p["jaccard_random_strat"]))
            else:
                side = "o1" if a < b else "o2"
                row.append(_cell(measure, p[side], p[f"{side}_random"], p[f"{side}_random_strat"]))
        grid.append(row)
    return grid


GRID_CSV = ["measure", "value", "observed", "chance", "chance_strat", "lift", "lift_strat"]
GRID_CSV_MEANING = {
    "measure": "what `value` holds: o1, jaccard, lift (o1 / pooled chance), lift_strat (o1 / stratified chance) or "
               "directions (the left-subspace overlap at k = e90, its chance k/m; no stratified chance)",
    "value": "the cell as the heatmap shows it",
    "observed": "the overlap observed: o1 = |A∩B|/|A| (row A, column B), or the Jaccard |A∩B|/|A∪B| for jaccard",
    "chance": "that overlap expected for independent runs with every parameter alike (pooled chance)",
    "chance_strat": "that overlap expected under the stratified null (strata: tensor × exponent of |w0|)",
    "lift": "observed / chance",
    "lift_strat": "observed / chance_strat",
}


def grid_columns(header: list[str]) -> dict[str, str]:
    """What each column of grid_rows' or block_rows' CSV holds (for the export's sidecar)."""
    names = {"run_a": "the row's run (A)", "run_b": "the column's run (B)", "group_a": "the row's run group",
             "group_b": "the column's run group", "pairs": "run pairs pooled in the cell (means over them)"}
    return {h: names.get(h) or GRID_CSV_MEANING[h] for h in header}


def _grid_values(c: GridCell) -> list:
    return [c.value, c.observed, c.chance, c.chance_strat, c.lift, c.lift_strat]


def grid_rows(sel: SelectedStats, labels: list[str], measure: str) -> tuple[list[str], list[list]]:
    """The grid as CSV rows: one per ordered pair of chosen runs, the observed overlap, both chances, both lifts."""
    header = ["run_a", "run_b", *GRID_CSV]
    rows = []
    for a, cells in zip(sel.runs, overlap_grid(sel, measure)):
        for b, c in zip(sel.runs, cells):
            if a != b:
                rows.append([labels[a], labels[b], measure, *_grid_values(c)])
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
    return (f"o1 within {ratio(within.o1, 3).lstrip('0')} {lifts_text(within.lift('o1'), within.lift_strat('o1'), ' ')}"
            f" · between {ratio(between.o1, 3).lstrip('0')} "
            f"{lifts_text(between.lift('o1'), between.lift_strat('o1'), ' ')}")


def block_grid(sel: SelectedStats, groups, measure: str) -> tuple[list[str], list[list[GridCell]]]:
    """Groups × groups: each cell the mean measure over the chosen run pairs between the two (within on the
    diagonal); lift = mean observed over mean chance, pooled or stratified."""
    from rlsub_tui.summaries.groups import blocks

    if measure == "directions":
        return [f"{g.name} ({len(g.runs)})" for g in groups], _direction_blocks(sel, groups)
    key = "jaccard" if measure == "jaccard" else "o1"
    grid = []
    for row in blocks(sel.stats, groups, sel.runs):
        cells = [_cell(measure, getattr(f, key), getattr(f, f"{key}_random"), getattr(f, f"{key}_random_strat"))
                 if f.pairs else GridCell(math.nan, math.nan, math.nan) for f in row]
        grid.append(cells)
    return [f"{g.name} ({len(g.runs)})" for g in groups], grid


def _direction_blocks(sel: SelectedStats, groups) -> list[list[GridCell]]:
    """Groups × groups of the left-subspace overlap (k: e90): the mean over the chosen pairs between the two."""
    chosen, grid = set(sel.runs), []
    for ga in groups:
        cells = []
        for gb in groups:
            pairs = {(min(a, b), max(a, b)) for a in ga.runs for b in gb.runs if a != b and {a, b} <= chosen}
            found = [sel.stats.subspaces.pair(a, b, "left") for a, b in sorted(pairs)]
            ov, ch = overlap.nan_mean([f[0] for f in found]), overlap.nan_mean([f[1] for f in found])
            cells.append(GridCell(ov, ch, overlap.lift(ov, ch), ov) if found else GridCell(math.nan, math.nan, math.nan))
        grid.append(cells)
    return grid


def block_rows(sel: SelectedStats, groups, measure: str) -> tuple[list[str], list[list]]:
    from rlsub_tui.summaries.groups import blocks

    header = ["group_a", "group_b", "pairs", *GRID_CSV]
    names, grid = block_grid(sel, groups, measure)
    figs = blocks(sel.stats, groups, sel.runs)
    rows = []
    for ga, cells, frow in zip(groups, grid, figs):
        for gb, c, f in zip(groups, cells, frow):
            rows.append([ga.name, gb.name, f.pairs, measure, *_grid_values(c)])
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
