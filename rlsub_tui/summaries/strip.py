"""The answer at a glance, without Textual: the summary strip's lines and the K×K overlap grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlsub_tui.checkpoints.names import place
from rlsub_tui.records import overlap
from rlsub_tui.summaries.selection import OverlapFigure, SelectedStats
from rlsub_tui.summaries.tree import CHART_TITLES, ChartData
from rlsub_tui.summaries.tree import rank_chart as matrix_rank_chart
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


def overlap_chart(sel: SelectedStats, metric: str = "o1", labels: list[str] | None = None):
    """Per pair of chosen runs (numbered as in the run list): observed, both chance levels (pooled and
    stratified by tensor × |w0| exponent) and lift = observed / pooled chance, which the chart draws."""
    title = "Jaccard |A∩B|/|A∪B|" if metric == "jaccard" else "o1 = |A∩B|/|A|"
    if len(sel.runs) < 2:
        return ChartData("overlap", title, "pair", metric, [], {}, message="overlap needs two or more chosen runs: press r")
    key, chance_key = ("jaccard", "jaccard_random") if metric == "jaccard" else ("o1", "o1_random")
    ticks, run_a, run_b, observed, chance, strat = [], [], [], [], [], []
    for a, b, p in sel.pairs():
        ticks.append(f"{a + 1}·{b + 1}")
        run_a.append(labels[a] if labels else a + 1)
        run_b.append(labels[b] if labels else b + 1)
        observed.append(p[key])
        chance.append(p[chance_key])
        strat.append(p[f"{chance_key}_strat"])
    lift = [overlap.lift(o, c) for o, c in zip(observed, chance)]
    message = None
    if not sel.numel:
        message = "waiting for results…"
    elif all(math.isnan(x) for x in observed):
        message = "undefined: no chosen run updated a parameter here (pick a larger node or press r)"
    meaning = {"run_a": "run A (number i in the chart's i·j)", "run_b": "run B (number j)",
               "o1": "|A∩B|/|A|: share of A's updated parameters that B also updated",
               "o1_random": "o1 if B were a uniformly random set of its size: |B|/n",
               "o1_random_strat": "o1 under the stratified null (per tensor × |w0| exponent): E/|A|",
               "jaccard": "|A∩B|/|A∪B|", "jaccard_random": "Jaccard of independent random sets: pq/(p+q-pq)",
               "jaccard_random_strat": "Jaccard under the stratified null: E/(|A|+|B|-E)",
               "lift": f"{key} / {chance_key} (what the chart draws)"}
    return ChartData("overlap", f"lift of {title} over chance, per run pair i·j", "pair", metric,
                     list(range(len(ticks))),
                     {key: observed, chance_key: chance, f"{chance_key}_strat": strat, "lift": lift}, ticks,
                     message=message, percent=False, meaning=meaning,
                     x_columns={"run_a": run_a, "run_b": run_b})


def agreement_chart(sel: SelectedStats):
    """Percent of parameters updated by exactly j of the chosen runs, observed and by chance (pooled; for all
    runs also the stratified chance)."""
    title = CHART_TITLES["agreement"] + " (% of params)"
    if not sel.numel:
        return ChartData("agreement", title, "j", "% of params", [], {}, message="waiting for results…")
    observed = sel.agreement()
    if observed is None:
        return ChartData("agreement", title, "j", "% of params", [], {},
                         message="a subset's agreement is recorded up to 10 runs: press r and choose all")
    series = {"observed": [100 * float(c) / sel.numel for c in observed],
              "chance": [100 * float(c) / sel.numel for c in sel.agreement_chance()]}
    meaning = {"j": "number of chosen runs that updated a parameter",
               "observed": "share of parameters updated by exactly j chosen runs",
               "chance": "that share for independent runs of the same densities (Poisson-binomial)"}
    if sel.all_runs:
        series["chance tensor×|w0|"] = [100 * float(c) / sel.numel for c in sel.stats.agreement_chance_strat()]
        meaning["chance tensor×|w0|"] = "the same per tensor × |w0| exponent stratum, summed over strata"
    return ChartData("agreement", title, "j", "% of params", list(range(len(sel.runs) + 1)), series,
                     meaning=meaning)


# ------------------------------------------------------------------------------------------------------
# Charts that follow the focus: a node inside one layer is shown against its peers in every layer


@dataclass
class MarkedChart(ChartData):
    """A chart over layers with one layer marked (the focused one)."""

    marked: int | None = None


@dataclass
class LayerProfile:
    """Tensors grouped by layer index, and the layer the focus sits in (None when it spans several)."""

    by_layer: dict[int, list[str]]
    marked: int | None
    what: str  # "every self_attn.q_proj.weight", "all tensors", "every mlp tensor"


def layer_profile(node, result) -> LayerProfile:
    """The node's tensors by layer; a node inside a single layer gets the same tensor types from every layer."""
    placed = [(t, place(t)) for t in node.tensors]
    layers = {p.layer for _, p in placed if p.layer is not None}
    if len(layers) != 1:
        by_layer: dict[int, list[str]] = {}
        for t, p in placed:
            if p.layer is not None:
                by_layer.setdefault(p.layer, []).append(t)
        return LayerProfile(by_layer, None, "")
    types = {p.tensor_type for _, p in placed if p.layer is not None}
    by_layer = {}
    for t in result.planned:
        p = place(t)
        if p.layer is not None and p.tensor_type in types:
            by_layer.setdefault(p.layer, []).append(t)
    what = (f"every {next(iter(types))}" if len(types) == 1 else "all tensors" if node.level == "layer"
            else f"every {node.label} tensor")
    return LayerProfile(by_layer, next(iter(layers)), what)


def depth_chart(node, result, runs: tuple[int, ...]):
    """Sparsity per layer for each chosen run; inside one layer, the same tensor types across all layers."""
    prof = layer_profile(node, result)
    title = f"sparsity by layer: {prof.what}" if prof.marked is not None else CHART_TITLES["depth"]
    series: dict[str, list[float]] = {result.run_labels[i]: [] for i in runs}
    xs = []
    for layer in sorted(prof.by_layer):
        s = result.stats(prof.by_layer[layer])
        if s.tensors == 0:
            continue
        xs.append(layer)
        for i in runs:
            series[result.run_labels[i]].append(100 * s.sparsity(i))
    msg = None
    if not prof.by_layer:
        msg = "no layered tensors here (embedding, head, final norm): move to a layer or the model"
    elif not xs:
        msg = "waiting for results…"
    return MarkedChart("depth", title, "layer", "sparsity %", xs, series, message=msg, marked=prof.marked)


def rank_chart(node, result, runs: tuple[int, ...]):
    """Mean rank ratio per 2-D matrix; inside one layer, that matrix type's ratio in every layer, focus marked."""
    prof = layer_profile(node, result)
    if prof.marked is None:
        return matrix_rank_chart(node, result)
    xs, ys = [], []
    for layer in sorted(prof.by_layer):
        ratios = [s.rank / r.max_rank for t in prof.by_layer[layer] if (r := result.tensors.get(t)) and r.max_rank
                  for i, s in enumerate(r.runs) if i in runs and s.rank is not None]
        if ratios:
            xs.append(layer)
            ys.append(100 * float(sum(ratios) / len(ratios)))
    msg = None if xs else _no_rank_reason(prof, result)
    return MarkedChart("rank", f"rank/max by layer: {prof.what} (mean of runs)",
                       "layer", "rank / max %", xs, {"rank ratio": ys}, message=msg, marked=prof.marked)


def _no_rank_reason(prof: LayerProfile, result) -> str:
    records = [result.tensors[t] for ts in prof.by_layer.values() for t in ts if t in result.tensors]
    if not records:
        return "waiting for results…"
    if not any(r.max_rank for r in records):
        return "1-D tensors have no rank: move to a 2-D matrix (a *_proj)"
    return "no rank computed for these matrices (started with --no-rank)"


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


def delta_chart(detail, labels: list[str]) -> MarkedChart:
    """% of the tensor's parameters per log2 |Δ| bin, one series per chosen run; the atol tolerance marked."""
    counts = detail.log2_counts
    used = [i for i in range(counts.shape[1]) if counts[:, i].any()]
    title = f"log2 |Δ| of {detail.name.rsplit('.', 2)[-2] if '.' in detail.name else detail.name}"
    if not used:
        return MarkedChart("delta", title, "log2 |Δ|", "% of params", [], {},
                           message="no chosen run changed this tensor (Δ = 0 everywhere)")
    lo, hi = used[0], used[-1]
    numel = int(detail.cell_numel.sum())
    xs = [int(x) for x in detail.log2_bins[lo:hi + 1]]
    series = {labels[r]: [100 * float(c) / numel for c in counts[j, lo:hi + 1]] for j, r in enumerate(detail.runs)}
    tol = detail.tolerance_log2
    suffix = f", tolerance 2^{tol:.1f}" if tol is not None else ""
    return MarkedChart("delta", title + suffix, "log2 |Δ| (bin x: [2^x, 2^(x+1)))", "% of params", xs, series,
                       marked=tol)


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
