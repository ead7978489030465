"""The explorer's tables, without Textual: per node its children with every node measure, per tensor its runs."""

from __future__ import annotations

import math

from rlsub_tui.records import measures, overlap
from rlsub_tui.records.measures import SPECTRUM_RATIOS, Column
from rlsub_tui.records.results import AnalysisResult, Stats
from rlsub_tui.records.subspaces import BASE
from rlsub_tui.records.subspaces import SIDES as SUBSPACE_SIDES
from rlsub_tui.summaries.tree import Node


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
        "jaccard_lift_strat": overlap.lift(jac, s.mean_jaccard_chance_strat()),
        "consensus_chance_strat": s.consensus_chance_strat() if result.k > 1 else math.nan,
        "done": f"{s.tensors}/{len(node.tensors)}",
    })
    values.update({f"spectrum:{f}": s.mean_spectrum_ratio(f) for f in SPECTRUM_RATIOS})
    for side in SUBSPACE_SIDES:
        values[f"subspace_{side}"], values[f"subspace_{side}_chance"] = s.subspaces.figure(side)
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
        for side in SUBSPACE_SIDES:
            row[f"base_subspace_{side}"], row[f"base_subspace_{side}_chance"] = one.subspaces.pair(i, BASE, side)
        for count in ("true_updated", "updated_bf16_visible"):
            if row[count] is None:
                row[count] = math.nan
        rows.append(row)
    return rows


def node_table(node: Node, result: AnalysisResult, index: StatsIndex | None = None
               ) -> tuple[list[Column], list[dict]]:
    """What the table shows for a node: its children, or for a single tensor one row per run."""
    if node.is_tensor:
        return tensor_columns(result), tensor_rows(node.tensors[0], result)
    return table_columns(result), table_rows(node, result, index)
