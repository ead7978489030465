"""Every chart the explorer draws, built once, without Textual: the views' registry (key, name, title, tooltip)
and each chart's data, small enough to plot, written to CSV as fractions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rlsub_tui.checkpoints.names import place
from rlsub_tui.records import overlap
from rlsub_tui.records.criteria import MAG_BINS, MAG_X_MIN, ULP_LOG2_MIN
from rlsub_tui.records.results import AnalysisResult
from rlsub_tui.records.spectrum import CURVE_POINTS as SPECTRUM_POINTS
from rlsub_tui.summaries.selection import SelectedStats
from rlsub_tui.summaries.tree import Node

if TYPE_CHECKING:
    from rlsub_tui.records.timelines import TimelineResult

CHANCE_POOLED = "chance"  # the paper's null: every parameter alike


CHANCE_STRAT = "chance tensor×|w0|"  # the stratified null: per tensor and |w0| exponent


@dataclass
class ChartData:
    name: str
    title: str
    xlabel: str
    ylabel: str
    x: list
    series: dict[str, list[float]]
    xticks: list[str] | None = None
    message: str | None = None  # shown instead of a plot when there is nothing to draw
    percent: bool = True  # series are percentages (for the plot); exports write fractions
    x_columns: dict[str, list] | None = None  # what exports write instead of x (run names, tolerances)
    meaning: dict[str, str] = field(default_factory=dict)  # export column -> what it holds

    def rows(self) -> tuple[list[str], list[list]]:
        """The chart's data as written to CSV: fractions, never percent, and named x values."""
        xcols = self.x_columns or {self.xlabel: list(self.xticks or self.x)}
        scale = 0.01 if self.percent else 1.0
        header = list(xcols) + list(self.series)
        rows = [[xcols[c][i] for c in xcols] + [float(self.series[s][i]) * scale for s in self.series]
                for i in range(len(self.x))]
        return header, rows

    def columns(self) -> dict[str, str]:
        header, _ = self.rows()
        return {c: self.meaning.get(c, self.meaning.get("*", "")) for c in header}


@dataclass(frozen=True)
class View:
    """One view of the chart pane: its name, the key that shows it, its footer label, title and tooltip. The
    explorer's bindings, its `]`/`[` cycle, the command palette and the help screen all read VIEWS."""

    name: str
    key: str
    label: str
    title: str
    tooltip: str = ""

    @property
    def help(self) -> str:
        return self.tooltip or f"Chart: {self.title}"


VIEWS: tuple[View, ...] = (  # in the order `]` cycles through them
    View("depth", "1", "Depth", "sparsity by layer depth"),
    View("overlap", "2", "Overlap", "overlap between runs"),
    View("agreement", "3", "Agreement", "updated by exactly j of K runs"),
    View("rank", "4", "Rank", "update rank per matrix"),
    View("sweep", "5", "Sweep", "sparsity against tolerance"),
    View("magnitude", "6", "Magnitude", "updated fraction by |w0|"),
    View("timeline", "t", "Timeline", "training timeline",
         "Training timeline of a RUN that is a folder of step checkpoints"),
    View("spectrum", "0", "Spectrum", "cumulative energy of Δ's spectrum",
         "Cumulative energy of Δ's singular values against k/min(m,n), per run"),
    View("precision", "p", "Precision", "distance to bf16 visibility",
         "Distance of true updates to bf16 visibility, one series per run"),
    View("heatmap", "7", "Heatmap", "overlap heatmap", "Overlap of every pair of chosen runs, coloured by lift over chance"),
    View("maskmap", "8", "Mask map", "mask map",
         "The focused tensor as blocks shaded by the fraction updated (m: which run)"),
    View("delta", "9", "Δ histogram", "Δ histogram", "Distribution of log2 |Δ| in the focused tensor, per chosen run"),
)
VIEW_NAMES = [v.name for v in VIEWS]
NOT_CHARTS = ("heatmap", "maskmap", "delta")  # drawn by their own panels, or from one tensor read on demand
CHARTS = [v.name for v in VIEWS if v.name not in NOT_CHARTS]
CHART_TITLES = {v.name: v.title for v in VIEWS}


def chart(name: str, node: Node, result: AnalysisResult, sel: SelectedStats, overlap_metric: str = "o1",
          timeline=None, timeline_state: str = "none") -> ChartData:
    """Chart `name` of the focused node over the chosen runs (`sel`); `timeline` (a TimelineResult) feeds the
    timeline chart, `timeline_state` says why it is absent."""
    if name == "overlap":
        return overlap_chart(sel, overlap_metric, result.run_labels)
    if name == "agreement":
        return agreement_chart(sel)
    if name == "depth":
        return depth_chart(node, result, sel.runs)
    if name == "rank":
        return rank_chart(node, result, sel.runs)
    if name == "timeline":
        return timeline_chart(node, timeline, timeline_state)
    return {"sweep": sweep_chart, "magnitude": magnitude_chart, "spectrum": spectrum_chart,
            "precision": precision_chart}[name](node, result)


TIMELINE_ABSENT = {
    "none": "no timeline: name a folder of step checkpoints (checkpoint-N, global_step_N, ...) as a RUN",
    "waiting": "computing the timeline after the runs…",
    "cancelled": "the timeline was not computed (cancelled)",
}


def timeline_chart(node: Node, timeline: TimelineResult | None, state: str = "none") -> ChartData:
    """Per timeline run and step, pooled over the node: sparsity vs base, vs the previous step, union density.

    Points a run does not have (another run's steps; no previous step yet) are NaN and not drawn.
    """
    title = "timeline: sparsity vs base, vs previous step, and union density"
    if timeline is None:
        return ChartData("timeline", title, "step", "%", [], {}, message=TIMELINE_ABSENT.get(state, state))
    wanted = set(node.tensors)
    sums: dict[tuple[str, int], list[int]] = {}
    for r in timeline.rows:
        if r.tensor in wanted:
            acc = sums.setdefault((r.run, r.step), [0, 0, 0, 0, 0])
            acc[0] += r.numel
            acc[1] += r.updated_vs_base
            acc[2] += r.union_so_far
            if r.updated_vs_prev is not None:
                acc[3] += r.updated_vs_prev
                acc[4] += r.numel
    xs = sorted({step for _, step in sums})
    series: dict[str, list[float]] = {}
    gap = f"{timeline.gap}-step" if timeline.gap > 1 else "step"
    for run in timeline.runs:
        vs_base, vs_prev, union = [], [], []
        for x in xs:
            n, upd, uni, upd_prev, n_prev = sums.get((run.label, x), [0, 0, 0, 0, 0])
            vs_base.append(100 * (1 - upd / n) if n else math.nan)
            union.append(100 * uni / n if n else math.nan)
            vs_prev.append(100 * (1 - upd_prev / n_prev) if n_prev else math.nan)
        series[f"{run.label} sparsity vs base"] = vs_base
        series[f"{run.label} sparsity vs {gap}"] = vs_prev
        series[f"{run.label} union density"] = union
    msg = None if xs else "no timeline numbers for these tensors"
    back = f"the checkpoint {timeline.gap} step(s) before in the run's list" if timeline.gap > 1 else "the step before"
    meaning = {"step": "the training step of the checkpoint (from its folder name)"}
    for run in timeline.runs:
        meaning[f"{run.label} sparsity vs base"] = "1 − updated against the base / params, pooled over the node"
        meaning[f"{run.label} sparsity vs {gap}"] = f"1 − updated against {back} / params, pooled over the node"
        meaning[f"{run.label} union density"] = ("parameters updated against the base at this step or any "
                                                 "earlier one / params, pooled over the node")
    return ChartData("timeline", title + " (%)", "step", "% of params", xs, series, message=msg, meaning=meaning)


def matrix_rank_chart(node: Node, result: AnalysisResult) -> ChartData:
    ticks, ratios = [], []
    for t in node.tensors:
        r = result.tensors.get(t)
        if r is None or r.max_rank is None or not r.max_rank:
            continue
        rs = [s.rank / r.max_rank for s in r.runs if s.rank is not None]
        if rs:
            ticks.append(t)
            ratios.append(100 * float(np.mean(rs)))
    msg = None if ticks else "no 2-D matrices with a computed rank here"
    return ChartData("rank", CHART_TITLES["rank"] + " (mean over runs)", "matrix", "rank / max %",
                     list(range(len(ticks))), {"rank ratio": ratios}, ticks, message=msg,
                     x_columns={"tensor": ticks},
                     meaning={"tensor": "a 2-D tensor", "rank ratio": "mean over runs of rank(Δ)/min(m,n)"})


def sweep_chart(node: Node, result: AnalysisResult) -> ChartData:
    if not result.sweep:
        return ChartData("sweep", CHART_TITLES["sweep"], "log10 tol", "sparsity %", [], {},
                         message="no tolerance sweep: press c and give a sweep, or start with --sweep")
    s = result.stats(node.tensors)
    xs = [math.log10(t) if t > 0 else -12.0 for t in result.sweep]
    series = {label: [100 * s.sweep_sparsity(i, j) for j in range(len(result.sweep))]
              for i, label in enumerate(result.run_labels)}
    msg = None if s.tensors else "waiting for results…"
    return ChartData("sweep", CHART_TITLES["sweep"], "log10 tolerance", "sparsity %", xs, series, message=msg,
                     x_columns={"tolerance": list(result.sweep)},
                     meaning={"tolerance": "atol tolerance t", "*": "update sparsity of that run under atol t"})


def magnitude_chart(node: Node, result: AnalysisResult) -> ChartData:
    s = result.stats(node.tensors)
    xs, series = [], {label: [] for label in result.run_labels}
    for b in range(1, MAG_BINS):
        if s.magnitude_numel[b] == 0:
            continue
        xs.append(MAG_X_MIN + b - 1)  # |w0| in [2^x, 2^(x+1)), clamped at the ends
        for i, label in enumerate(result.run_labels):
            series[label].append(100 * s.magnitude_updated[i, b] / s.magnitude_numel[b])
    msg = None if xs else "waiting for results…"
    return ChartData("magnitude", CHART_TITLES["magnitude"] + " (|w0| in [2^x, 2^(x+1)))", "log2 |w0|",
                     "updated %", xs, series, message=msg,
                     meaning={"log2 |w0|": "x: base weights with |w0| in [2^x, 2^(x+1)); the first and last bins "
                                           "also hold smaller and larger |w0| (zeros are left out)",
                              "*": "share of that bin's parameters the run updated"})


def spectrum_chart(node: Node, result: AnalysisResult) -> ChartData:
    """Share of ‖Δ‖_F² in the top k singular values against k / min(m, n), one line per run: the focused
    matrix's own curve, or for a group the unweighted mean of its matrices' curves."""
    curves = {label: [] for label in result.run_labels}
    matrices = 0
    for t in node.tensors:
        r = result.tensors.get(t)
        if r is None or not r.max_rank:
            continue
        matrices += 1
        for label, s in zip(result.run_labels, r.runs):
            if s.energy_curve:
                curves[label].append(s.energy_curve)
    series = {label: [100 * float(v) for v in np.mean(np.asarray(c), axis=0)] for label, c in curves.items() if c}
    xs = [j / SPECTRUM_POINTS for j in range(SPECTRUM_POINTS + 1)]
    title = CHART_TITLES["spectrum"] + ("" if node.is_tensor else f" (mean of {matrices} matrices)")  # short:
    # plotext drops a title wider than the plot
    msg = None if series else ("no 2-D matrices with a computed spectrum here" if matrices or result.tensors
                               else "waiting for results…")
    return ChartData("spectrum", title, "k / min(m,n)", "energy %", xs if series else [], series, message=msg,
                     meaning={"k / min(m,n)": "x: the top k singular values of Δ, as a share of min(m, n)",
                              "*": "share of ‖Δ‖_F² in those k singular values (%)"})


def precision_chart(node: Node, result: AnalysisResult) -> ChartData:
    """Share of each run's true updates per log2 bin of r = |Δ| / (ULP_bf16(w0) / 2): left of
    0, below half a bf16 ULP. For nodes where every pair is bf16, the x axis is |Δ| in ULPs (log2 r − 1)."""
    s = result.stats(node.tensors)
    totals = s.ulp_histogram.sum(axis=1)
    used = np.flatnonzero(s.ulp_histogram.sum(axis=0))
    if not len(used):
        msg = "waiting for results…" if not s.tensors else "no true updates in a pair of bf16 or finer here"
        return ChartData("precision", CHART_TITLES["precision"], "log2 r", "% of true updates", [], {}, message=msg)
    bins = range(int(used[0]), int(used[-1]) + 1)
    in_ulps = not s.fine_tensors.any()  # only bf16 pairs: r ≥ 1 always, show |Δ| in ULPs instead
    log2_ulp = [ULP_LOG2_MIN + b for b in bins]
    xs = log2_ulp if in_ulps else [x + 1 for x in log2_ulp]
    series = {label: [100 * float(s.ulp_histogram[i, b] / totals[i]) for b in bins]
              for i, label in enumerate(result.run_labels) if totals[i]}
    hidden = [f"{i + 1}:{100 * s.hidden_by_bf16(i):.1f}%" for i in range(result.k) if s.fine_tensors[i]]
    title = (CHART_TITLES["precision"] + (": |Δ| in bf16 ULPs of w0" if in_ulps else  # short: plotext cuts
                                          " · hidden " + " ".join(hidden[:3]) + ("…" if len(hidden) > 3 else "")))
    return ChartData("precision", title, "log2 |Δ|/ULP" if in_ulps else "log2 r", "% of true updates", xs, series,
                     x_columns={"log2_r": [x + 1 for x in log2_ulp], "log2_ulp": log2_ulp},
                     meaning={"log2_r": "x: true updates with r = |Δ| / (ULP_bf16(w0)/2) in [2^x, 2^(x+1)); "
                                        "r < 1 (x < 0) is below half a bf16 ULP; the end bins also hold what "
                                        "lies beyond them",
                              "log2_ulp": "the same bin as |Δ| / ULP_bf16(w0) in [2^x, 2^(x+1)) (log2_r − 1)",
                              "*": "share of that run's true updates (pairs of bf16 or finer) in the bin"})


def overlap_chart(sel: SelectedStats, metric: str = "o1", labels: list[str] | None = None):
    """Per pair of chosen runs (numbered as in the run list): observed, both chance levels (pooled and
    stratified by tensor × |w0| exponent) and both lifts, observed / pooled and / stratified chance, which the
    chart draws."""
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
    lift_strat = [overlap.lift(o, c) for o, c in zip(observed, strat)]
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
               "lift": f"{key} / {chance_key} (the chart's pooled points)",
               "lift_strat": f"{key} / {chance_key}_strat (the chart's stratified points: the honest margin)"}
    return ChartData("overlap", f"lift of {title} over chance, per run pair i·j", "pair", metric,
                     list(range(len(ticks))),
                     {key: observed, chance_key: chance, f"{chance_key}_strat": strat, "lift": lift,
                      "lift_strat": lift_strat}, ticks,
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


def layer_profile(node: Node, result: AnalysisResult) -> LayerProfile:
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


def depth_chart(node: Node, result: AnalysisResult, runs: tuple[int, ...]) -> MarkedChart:
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


def rank_chart(node: Node, result: AnalysisResult, runs: tuple[int, ...]) -> ChartData:
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


def _no_rank_reason(prof: LayerProfile, result: AnalysisResult) -> str:
    records = [result.tensors[t] for ts in prof.by_layer.values() for t in ts if t in result.tensors]
    if not records:
        return "waiting for results…"
    if not any(r.max_rank for r in records):
        return "1-D tensors have no rank: move to a 2-D matrix (a *_proj)"
    return "no rank computed for these matrices (started with --no-rank)"


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
