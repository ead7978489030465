"""What the explorer shows, without Textual: the node hierarchy, the children table and each chart's data.

The UI only renders these; the tests and the CSV export use the same functions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from rlsub_tui.checkpoints.names import place, tensor_kind
from rlsub_tui.records import measures
from rlsub_tui.records.criteria import MAG_BINS, MAG_X_MIN, ULP_LOG2_MIN
from rlsub_tui.records.measures import SPECTRUM_RATIOS, Column
from rlsub_tui.records.results import AnalysisResult, Stats
from rlsub_tui.records.spectrum import CURVE_POINTS as SPECTRUM_POINTS

KIND_ORDER = ["embedding", "attention", "mlp", "norm", "head", "other"]
CHANCE_POOLED = "chance"  # the paper's null: every parameter alike
CHANCE_STRAT = "chance tensor×|w0|"  # the stratified null: per tensor and |w0| exponent


Level = Literal["group", "model", "layer", "submodule", "kind", "type", "tensor"]  # a tree node's place


@dataclass
class Node:
    """One entry of the tree: a group of tensors (or one tensor) and its children."""

    key: str
    label: str
    tensors: list[str]
    children: list["Node"] = field(default_factory=list)
    is_tensor: bool = False
    level: Level = "group"

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


def _layer_sort_key(path: str):
    tail = path.rsplit(".", 1)[-1]
    return (0, int(tail)) if tail.isdigit() else (1, path)


def _group(groups: dict[str, Node], key: str, label: str, level: Level, parent: Node | None) -> Node:
    """The group node of this key, created (and attached to its parent) on first use."""
    node = groups.get(key)
    if node is None:
        node = groups[key] = Node(key, label, [], level=level)
        if parent is not None:
            parent.children.append(node)
    return node


def build_tree(names: list[str], model_label: str = "model") -> list[Node]:
    """Two roots: the model by structure (layers → submodules → tensors), and the same tensors by type."""
    model = Node("model", model_label, list(names), level="model")
    groups: dict[str, Node] = {}
    top_level: list[Node] = []
    for name in names:
        p = place(name)
        leaf = Node(f"tensor:{name}", p.leaf if p.layer_path else name, [name], is_tensor=True, level="tensor")
        if p.layer_path is None:
            top_level.append(leaf)
            continue
        layer = _group(groups, p.layer_path, f"layer {p.layer}", "layer", None)
        layer.tensors.append(name)
        parent = layer
        if p.submodule:
            parent = _group(groups, f"{p.layer_path}.{p.submodule}", p.submodule, "submodule", layer)
            parent.tensors.append(name)
        parent.children.append(leaf)
    layers = sorted((g for g in groups.values() if g.level == "layer"), key=lambda g: _layer_sort_key(g.key))
    first = [n for n in top_level if tensor_kind(n.label) == "embedding"]
    last = [n for n in top_level if n not in first]
    model.children = first + layers + last

    by_type = Node("by-type", "by type", list(names), level="model")
    for name in names:
        p = place(name)
        kind = tensor_kind(p.tensor_type)
        kn = _group(groups, f"kind:{kind}", f"all {kind}", "kind", None)
        kn.tensors.append(name)
        tn = _group(groups, f"type:{p.tensor_type}", p.tensor_type, "type", kn)
        tn.tensors.append(name)
        label = f"layer {p.layer}" if p.layer is not None else name
        tn.children.append(Node(f"{tn.key}/{name}", label, [name], is_tensor=True, level="tensor"))
    by_type.children = [groups[f"kind:{k}"] for k in KIND_ORDER if f"kind:{k}" in groups]
    return [model, by_type]


def find(roots: list[Node], key: str) -> Node | None:
    for r in roots:
        for n in r.walk():
            if n.key == key:
                return n
    return None


def filter_tree(roots: list[Node], text: str) -> list[Node]:
    """Keep tensors whose name contains `text` (case-insensitive) and the groups above them."""
    text = text.lower().strip()
    if not text:
        return roots

    def keep(node: Node) -> Node | None:
        if node.is_tensor:
            return node if any(text in t.lower() for t in node.tensors) else None
        kids = [k for k in (keep(c) for c in node.children) if k is not None]
        if not kids:
            return None
        tensors = [t for k in kids for t in k.tensors]
        return Node(node.key, node.label, tensors, kids, level=node.level)

    kept = []
    for root in roots:
        k = keep(root)
        if k is not None:  # the root says that its numbers pool only the matching tensors
            name = re.sub(r" \(\d+ tensors\)$", "", root.label)
            k.label = f"{name} (filter '{text}': {len(k.tensors)} of {len(root.tensors)} tensors)"
            kept.append(k)
    return kept


class StatsIndex:
    """Pooled statistics of every node, kept up to date as results arrive (each result is added once
    to the nodes that hold it), so redraws never re-pool the whole model."""

    def __init__(self, roots: list[Node], result: AnalysisResult):
        self.result = result
        self.by_key: dict[str, Stats] = {}
        self.members: dict[str, list[Stats]] = {}
        for root in roots:
            for node in root.walk():
                st = self.by_key[node.key] = Stats(result.k, len(result.sweep))
                for t in node.tensors:
                    self.members.setdefault(t, []).append(st)
        for r in result.tensors.values():
            self.add(r)

    def add(self, r) -> None:
        for st in self.members.get(r.name, ()):
            st.add(r)

    def get(self, node: Node) -> Stats:
        st = self.by_key.get(node.key)
        return st if st is not None else self.result.stats(node.tensors)


# --------------------------------------------------------------------------------------------------
# The children table


def table_columns(result: AnalysisResult) -> list[Column]:
    """The children table's columns, from the registry (measures.NODE_MEASURES): the most telling first."""
    return measures.node_columns(result.run_labels)


def row_values(node: Node, result: AnalysisResult, index: StatsIndex | None = None) -> dict:
    s = index.get(node) if index is not None else result.stats(node.tensors)
    jac, jac_chance = s.mean_jaccard()
    values = {"name": node.label, "numel": sum(result.planned_numel.get(t, 0) for t in node.tensors)}
    for i, label in enumerate(result.run_labels):
        values[f"sparsity:{label}"] = s.sparsity(i)
    values.update({
        "mean_sparsity": s.mean_sparsity(),
        "rank": s.mean_rank_ratio_all(),
        "jaccard": jac,
        "jaccard_chance": jac_chance,
        "consensus": s.consensus() if result.k > 1 else math.nan,
        "consensus_chance": s.consensus_chance() if result.k > 1 else math.nan,
        "jaccard_chance_strat": s.mean_jaccard_chance_strat(),
        "consensus_chance_strat": s.consensus_chance_strat() if result.k > 1 else math.nan,
        "done": f"{s.tensors}/{len(node.tensors)}",
    })
    values.update({f"spectrum:{f}": s.mean_spectrum_ratio(f) for f in SPECTRUM_RATIOS})
    values.update(measures.precision_and_line_figures(s))
    return values


def table_rows(node: Node, result: AnalysisResult, index: StatsIndex | None = None) -> list[dict]:
    """One row per child of the node."""
    return [row_values(c, result, index) for c in node.children]


def tensor_columns(result: AnalysisResult) -> list[Column]:
    """The one-tensor table's columns, from the registry (measures.RUN_MEASURES)."""
    return measures.run_columns(result.sweep)


def tensor_rows(name: str, result: AnalysisResult) -> list[dict]:
    """One row per run for a single tensor."""
    r = result.tensors.get(name)
    if r is None:
        return []
    rows = []
    one = Stats.of([r], result.k)
    for i, s in enumerate(r.runs):
        row = measures.run_figures(r, s)
        sweep = row.pop("sweep")
        row["run"] = result.run_labels[i]
        row["rank"] = "" if s.rank is None else s.rank
        row["max_rank"] = "" if s.rank is None else r.max_rank
        for j, t in enumerate(result.sweep):
            row[f"sweep:{t:g}"] = sweep[j] if j < len(sweep) else math.nan
        row.update(measures.precision_and_line_figures(one, i))
        if row["updated_bf16_visible"] is None:
            row["updated_bf16_visible"] = math.nan
        rows.append(row)
    return rows


def node_table(node: Node, result: AnalysisResult, index: StatsIndex | None = None
               ) -> tuple[list[Column], list[dict]]:
    """What the table shows for a node: its children, or for a single tensor one row per run."""
    if node.is_tensor:
        return tensor_columns(result), tensor_rows(node.tensors[0], result)
    return table_columns(result), table_rows(node, result, index)


# --------------------------------------------------------------------------------------------------
# Chart data: each returns a dict with x, series {label: ys}, and axis titles; small enough to plot.


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


CHARTS = ["depth", "overlap", "agreement", "rank", "sweep", "magnitude", "timeline", "spectrum", "precision"]
CHART_TITLES = {
    "depth": "sparsity by layer depth",
    "overlap": "overlap between runs",
    "agreement": "updated by exactly j of K runs",
    "rank": "update rank per matrix",
    "sweep": "sparsity against tolerance",
    "magnitude": "updated fraction by |w0|",
    "timeline": "training timeline",
    "spectrum": "cumulative energy of Δ's spectrum",
    "precision": "distance to bf16 visibility",
}


def chart(name: str, node: Node, result: AnalysisResult, overlap_metric: str = "o1", timeline=None,
          timeline_state: str = "none") -> ChartData:
    """`timeline` (a timeline.TimelineResult) feeds the timeline chart; `timeline_state` says why it is absent."""
    if name == "timeline":
        return timeline_chart(node, timeline, timeline_state)
    return {
        "depth": depth_chart, "overlap": lambda n, r: overlap_chart(n, r, overlap_metric),
        "agreement": agreement_chart, "rank": rank_chart, "sweep": sweep_chart, "magnitude": magnitude_chart,
        "spectrum": spectrum_chart, "precision": precision_chart,
    }[name](node, result)


TIMELINE_ABSENT = {
    "none": "no timeline: name a folder of step checkpoints (checkpoint-N, global_step_N, ...) as a RUN",
    "waiting": "computing the timeline after the runs…",
    "cancelled": "the timeline was not computed (cancelled)",
}


def timeline_chart(node: Node, timeline, state: str = "none") -> ChartData:
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
        series[f"{run.label} vs base"] = vs_base
        series[f"{run.label} {gap}"] = vs_prev
        series[f"{run.label} union"] = union
    msg = None if xs else "no timeline numbers for these tensors"
    return ChartData("timeline", title + " (%)", "step", "% of params", xs, series, message=msg)


def depth_chart(node: Node, result: AnalysisResult) -> ChartData:
    by_layer: dict[int, list[str]] = {}
    for t in node.tensors:
        p = place(t)
        if p.layer is not None:
            by_layer.setdefault(p.layer, []).append(t)
    layers = sorted(by_layer)
    series = {label: [] for label in result.run_labels}
    xs = []
    for layer in layers:
        s = result.stats(by_layer[layer])
        if s.tensors == 0:
            continue
        xs.append(layer)
        for i, label in enumerate(result.run_labels):
            series[label].append(100 * s.sparsity(i))
    msg = None if xs else ("no layered tensors in this node" if not layers else "waiting for results…")
    return ChartData("depth", CHART_TITLES["depth"], "layer", "sparsity %", xs, series, message=msg,
                     meaning={"layer": "layer index", "*": "update sparsity of that run over the layer's tensors"})


def overlap_chart(node: Node, result: AnalysisResult, metric: str = "o1") -> ChartData:
    s = result.stats(node.tensors)
    if result.k < 2:
        return ChartData("overlap", CHART_TITLES["overlap"], "pair", metric, [], {},
                         message="overlap needs two or more runs")
    key, chance_key = ("jaccard", "jaccard_random") if metric == "jaccard" else ("o1", "o1_random")
    ticks, run_a, run_b, observed, chance, strat = [], [], [], [], [], []
    for a, b, p in s.pairs():
        ticks.append(f"{a + 1}·{b + 1}")
        run_a.append(result.run_labels[a])
        run_b.append(result.run_labels[b])
        observed.append(p[key])
        chance.append(p[chance_key])
        strat.append(p[f"{chance_key}_strat"])
    title = "Jaccard |A∩B|/|A∪B|" if metric == "jaccard" else "o1 = |A∩B|/|A|"
    msg = None if s.tensors else "waiting for results…"
    meaning = {"run_a": "run A (number i in the chart's i·j)", "run_b": "run B (number j)",
               "o1": "|A∩B|/|A|: share of A's updated parameters that B also updated",
               "o1_random": "o1 if B were a uniformly random set of its size: |B|/n",
               "o1_random_strat": "o1 under the stratified null (per tensor × |w0| exponent): E/|A|",
               "jaccard": "|A∩B|/|A∪B|", "jaccard_random": "Jaccard of independent random sets: pq/(p+q-pq)",
               "jaccard_random_strat": "Jaccard under the stratified null: E/(|A|+|B|-E)"}
    return ChartData("overlap", f"{title} per run pair i·j vs chance", "pair", metric,
                     list(range(len(ticks))), {key: observed, chance_key: chance, f"{chance_key}_strat": strat},
                     ticks, message=msg, percent=False, x_columns={"run_a": run_a, "run_b": run_b}, meaning=meaning)


def agreement_chart(node: Node, result: AnalysisResult) -> ChartData:
    s = result.stats(node.tensors)
    if not s.numel:
        return ChartData("agreement", CHART_TITLES["agreement"], "j", "%", [], {}, message="waiting for results…")
    xs = list(range(result.k + 1))
    return ChartData("agreement", CHART_TITLES["agreement"] + " (% of params)", "j", "% of params", xs,
                     {"observed": [100 * float(c) / s.numel for c in s.agreement],
                      CHANCE_POOLED: [100 * float(c) / s.numel for c in s.agreement_chance()],
                      CHANCE_STRAT: [100 * float(c) / s.numel for c in s.agreement_chance_strat()]},
                     meaning={"j": "number of runs that updated a parameter",
                              "observed": "share of parameters updated by exactly j runs",
                              CHANCE_POOLED: "that share for independent runs of the same densities "
                                             "(Poisson-binomial)",
                              CHANCE_STRAT: "the same per tensor × |w0| exponent stratum, summed over strata"})


def rank_chart(node: Node, result: AnalysisResult) -> ChartData:
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
