"""One definition per measure: its name, headers, format and meaning, and the per-run formulas everyone reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rlsub_tui.util.files import atomic_write

# --------------------------------------------------------------------------------------------------
# Per-run formulas on one run's counts (over a tensor, or summed over a node): the only place they live


def fraction(part: float, whole: float) -> float:
    """part / whole; NaN when whole is zero (an undefined fraction, shown and written empty)."""
    return part / whole if whole else math.nan


def sparsity(updated: int, numel: int) -> float:
    """Update sparsity: 1 − updated / n."""
    return 1 - updated / numel if numel else math.nan


def mean_abs_delta(sum_abs_delta: float, numel: int) -> float:
    """Σ|Δ| / n (NaN/Inf positions add 0)."""
    return fraction(sum_abs_delta, numel)


def rel_delta_norm(sq_delta: float, sq_base: float) -> float:
    """‖Δ‖_F / ‖W0‖_F over the positions where the run's Δ is finite."""
    return math.sqrt(sq_delta / sq_base) if sq_base > 0 else math.nan


def rank_ratio(figure: float | None, max_rank: int | None) -> float:
    """A rank-like figure (the rank, or a spectrum figure) over max_rank = min(m, n); NaN when either is absent."""
    return figure / max_rank if figure is not None and max_rank else math.nan


def run_figures(record, s) -> dict:
    """Every per-run measure of one tensor (a results.TensorResult) for one run (its criteria.RunTensorStats),
    keyed as RUN_MEASURES; absent ranks are None, the spectrum figures also raw (`stable_rank`, ...), the sweep a
    list in the run's own sweep order."""
    n = record.numel
    max_rank = record.max_rank if s.rank is not None else None
    figures = {
        "updated": s.updated, "sparsity": sparsity(s.updated, n), "nonfinite": s.nonfinite,
        "mean_abs_delta": mean_abs_delta(s.sum_abs_delta, n) if n else math.nan,
        "rel_delta_norm": rel_delta_norm(s.sq_delta, s.sq_base),
        "rank": s.rank, "max_rank": max_rank, "rank_ratio": rank_ratio(s.rank, max_rank),
        "sweep": [sparsity(c, n) for c in s.sweep],
    }
    for f in SPECTRUM_RATIOS:
        figures[f] = getattr(s, f)
        figures[f"spectrum:{f}"] = rank_ratio(getattr(s, f), record.max_rank)
    return figures


def precision_and_line_figures(stats, i: int | None = None) -> dict:
    """Run i's true updates, bf16 visibility and row/column figures over a results.Stats (one tensor or a node), or
    pooled over every run (i None): `true_updated`, `true_sparsity`, `updated_bf16_visible` and `hidden_by_bf16`
    only over tensors whose run is stored finer than bf16 (None / NaN otherwise; the counts per run only), shares
    of the 2-D matrices' rows and columns holding an update with their uniform-chance levels (line-weighted)."""
    rows, rows_chance = stats.touched("rows", i)
    cols, cols_chance = stats.touched("cols", i)
    return {
        "true_updated": None if i is None else stats.true_updated_count(i),
        "true_sparsity": stats.mean_true_sparsity() if i is None else stats.true_sparsity(i),
        "updated_bf16_visible": None if i is None else stats.bf16_visible_count(i),
        "hidden_by_bf16": stats.mean_hidden_by_bf16() if i is None else stats.hidden_by_bf16(i),
        "row_share": rows, "row_share_chance": rows_chance, "col_share": cols, "col_share_chance": cols_chance,
    }


# --------------------------------------------------------------------------------------------------
# The registry


ColumnKind = Literal["text", "count", "pct", "ratio", "sci"]  # how a table column's values are shown


@dataclass(frozen=True)
class Column:
    """One column as a table draws it and an export names it: `help` is its definition."""

    key: str
    title: str
    kind: ColumnKind
    help: str


@dataclass(frozen=True)
class Measure:
    """A measure: `key` names it in the explorer's tables and their CSV export, `title` heads its table column,
    `csv` its column in `matrices.csv` (None: not there). `{run}` in key, title and definition stands for a run's
    label, `{t}` for a sweep tolerance."""

    key: str
    title: str
    kind: str  # how a table cell is formatted: text | count | pct | ratio | sci
    applies: str  # per run | pooled over runs | per run pair, mean | across runs | label
    definition: str
    csv: str | None = None

    def column(self, **fill) -> Column:
        return Column(self.key.format(**fill), self.title.format(**fill), self.kind, self.definition.format(**fill))


SPECTRUM_TITLES = {"stable_rank": "stable", "energy_rank_90": "e90", "energy_rank_99": "e99",
                   "effective_rank": "eff"}  # column titles of the spectrum figures, as ratios to min(m, n)
SPECTRUM_RATIOS = tuple(SPECTRUM_TITLES)  # the spectrum figures of each matrix and run (spectrum.py)
SPECTRUM_WORDS = {"stable_rank": "stable rank ‖Δ‖_F²/σ₁²",
                  "energy_rank_90": "energy rank at 90% (fewest σ holding 90% of Σσ²)",
                  "energy_rank_99": "energy rank at 99% (fewest σ holding 99% of Σσ²)",
                  "effective_rank": "effective rank exp(−Σ p ln p), p = σ/Σσ"}

SWEEP_CSV = "sparsity@{t}"


def sweep_csv(t: float) -> str:
    """The CSV header of the sparsity at sweep tolerance t: `sparsity@1e-05`."""
    return SWEEP_CSV.format(t=f"{t:g}")


_M = Measure
# The children table of a group node: one row per child, pooled (numel-weighted) over the child's tensors.
# The most telling numbers first, so they stay visible at 80 columns; the table scrolls for the rest.
NODE_MEASURES: tuple[Measure, ...] = (
    _M("name", "name", "text", "label", "the child's name"),
    _M("numel", "params", "count", "label", "parameters compared in the row"),
    _M("mean_sparsity", "sparsity", "pct", "pooled over runs",
       "mean over runs of the update sparsity 1 − updated / params (pooled, numel-weighted)"),
    _M("jaccard", "jacc", "ratio", "per run pair, mean",
       "mean over run pairs of the Jaccard index |A∩B|/|A∪B| of the updated sets"),
    _M("jaccard_chance", "@rnd", "ratio", "per run pair, mean",
       "the Jaccard expected for independent random sets of the same densities: pq/(p+q−pq)"),
    _M("jaccard_lift_strat", "J/str", "ratio", "per run pair, mean",
       "the honest margin: mean Jaccard over the mean Jaccard chance of the stratified null (@str)"),
    _M("consensus", "all K", "pct", "across runs", "consensus: fraction of parameters updated by every run"),
    _M("consensus_chance", "@rnd", "pct", "across runs",
       "consensus expected if runs were independent: the product of densities"),
    _M("rank", "rank", "pct", "pooled over runs",
       "mean of rank(Δ)/min(m,n) over the row's 2-D matrices and runs (PyTorch's default float32 tolerance)"),
    _M("sparsity:{run}", "sp {run}", "pct", "per run", "update sparsity of run {run}: 1 − updated / params"),
    _M("jaccard_chance_strat", "@str", "ratio", "per run pair, mean",
       "mean Jaccard chance of the stratified null: expected |A∩B| = Σ a_s·b_s/n_s over strata "
       "s = tensor × exponent of |w0|"),
    _M("consensus_chance_strat", "all K@str", "pct", "across runs",
       "consensus expected under the stratified null (a Poisson-binomial per stratum)"),
    *(_M(f"subspace_{side}{part}", f"dir{side[0].upper()}{title}", "ratio", "per run pair, mean", definition)
      for side in ("left", "right") for part, title, definition in (
          ("", "", f"subspace overlap of the runs' top-k {side} singular vectors, ‖U_Aᵀ U_B‖_F²/k, k the smaller "
                   "energy rank at 90% of the pair, k-weighted over matrices and pairs (1: the same directions)"),
          ("_chance", "@rnd", f"that overlap for independent random k-dim subspaces: k / {'m' if side == 'left' else 'n'}, "
                              "k-weighted alike"))),
    *(_M(f"spectrum:{f}", title, "pct", "pooled over runs",
         f"mean over 2-D matrices and runs of the {SPECTRUM_WORDS[f]}, divided by min(m,n)")
      for f, title in SPECTRUM_TITLES.items()),
    _M("true_sparsity", "true sp", "pct", "pooled over runs",
       "mean over the runs stored finer than bf16 (fp32 master weights) of their true-update sparsity: 1 − true "
       "updates / params, counted in the stored precision whatever the comparison dtype; empty for bf16 runs"),
    _M("hidden_by_bf16", "hid bf16", "pct", "pooled over runs",
       "true updates a bf16 cast hides (bf16(w1) = bf16(w0)) / true updates, pooled over runs and tensors whose "
       "run is stored finer than bf16 (fp32 master weights), whatever the comparison dtype; empty for bf16 runs"),
    _M("row_share", "rows", "pct", "pooled over runs",
       "share of the 2-D matrices' rows holding at least one update, row-weighted over matrices and runs"),
    _M("row_share_chance", "rows@rnd", "pct", "pooled over runs",
       "that share if each matrix's updates were spread uniformly: 1 − (1 − density)^(row length)"),
    _M("col_share", "cols", "pct", "pooled over runs",
       "share of the 2-D matrices' columns holding at least one update, column-weighted over matrices and runs"),
    _M("col_share_chance", "cols@rnd", "pct", "pooled over runs",
       "that share if each matrix's updates were spread uniformly: 1 − (1 − density)^(column length)"),
    _M("done", "done", "text", "label", "tensors computed so far / tensors in the row"),
)

# The table of one tensor: one row per run. `csv` names the same number in matrices.csv.
RUN_MEASURES: tuple[Measure, ...] = (
    _M("run", "run", "text", "label", "the run", "run"),
    _M("sparsity", "sparsity", "pct", "per run", "update sparsity 1 − updated / params", "sparsity"),
    _M("updated", "updated", "count", "per run", "parameters counted as updated", "updated"),
    _M("rank_ratio", "rank/max", "pct", "per run", "rank(Δ) / max", "rank_ratio"),
    _M("mean_abs_delta", "mean|Δ|", "sci", "per run", "mean absolute update Σ|Δ|/params (NaN/Inf add 0)",
       "mean_abs_delta"),
    _M("rel_delta_norm", "‖Δ‖/‖W0‖", "sci", "per run",
       "Frobenius norm of the update over that of the base (finite positions)", "rel_delta_norm"),
    _M("rank", "rank", "text", "per run", "rank of Δ (PyTorch's default float32 tolerance)", "rank"),
    _M("max_rank", "max", "text", "per run", "min(m, n); E·min(m, n) for a stack of E expert matrices",
       "max_rank"),
    *(_M(f"spectrum:{f}", title, "pct", "per run", f"{SPECTRUM_WORDS[f]}, divided by max")
      for f, title in SPECTRUM_TITLES.items()),
    _M("nonfinite", "NaN/Inf", "count", "per run",
       "positions where Δ is NaN or Inf (counted as updated, left out of |Δ|, norms and signs)", "nonfinite"),
    _M("true_updated", "true upd", "count", "per run",
       "true updates: parameters updated under the criterion in the run's stored precision (the base cast up "
       "exactly), whatever the comparison dtype (runs stored finer than bf16; empty otherwise)", "true_updated"),
    _M("true_sparsity", "true sp", "pct", "per run",
       "true-update sparsity 1 − true updates / params (runs stored finer than bf16; empty otherwise)",
       "true_sparsity"),
    _M("updated_bf16_visible", "vis bf16", "count", "per run",
       "positions whose bf16 casts differ, bf16(w1) ≠ bf16(w0) (runs stored finer than bf16; empty otherwise)",
       "updated_bf16_visible"),
    _M("hidden_by_bf16", "hid bf16", "pct", "per run",
       "true updates a bf16 cast hides / true updates (runs stored finer than bf16; empty otherwise)",
       "hidden_by_bf16"),
    _M("row_share", "rows", "pct", "per run", "share of the matrix's rows holding at least one update",
       "row_share"),
    _M("row_share_chance", "rows@rnd", "pct", "per run",
       "that share if the updates were spread uniformly: 1 − (1 − density)^(row length)", "row_share_chance"),
    _M("col_share", "cols", "pct", "per run", "share of the matrix's columns holding at least one update",
       "col_share"),
    _M("col_share_chance", "cols@rnd", "pct", "per run",
       "that share if the updates were spread uniformly: 1 − (1 − density)^(column length)", "col_share_chance"),
    *(_M(f"base_subspace_{side}{part}", f"W0 dir{side[0].upper()}{title}", "ratio", "per run", definition)
      for side in ("left", "right") for part, title, definition in (
          ("", "", f"overlap of the run's top-k {side} singular subspace of Δ with the base weight's own top-k "
                   "(k the smaller energy rank at 90% of the two): does the update write into the directions W0 uses?"),
          ("_chance", "@rnd", f"that overlap for random k-dim subspaces: k / {'m' if side == 'left' else 'n'}"))),
    _M("sweep:{t}", "sp@{t}", "pct", "per run", "sparsity under atol at tolerance {t}", SWEEP_CSV),
)

PRECISION_AND_LINE_CSV = ("updated_bf16_visible", "hidden_by_bf16", "row_share", "row_share_chance", "col_share",
                          "col_share_chance", "true_updated", "true_sparsity")  # precision_and_line_figures' keys,
# as matrices.csv orders them (the true updates added last); groups.csv leaves the per-run counts out
GROUP_PRECISION_AND_LINE_CSV = tuple(c for c in PRECISION_AND_LINE_CSV if c not in ("true_updated", "updated_bf16_visible"))
# matrices.csv, one row per tensor and run: these columns, in this order (the file's layout since version 1)
MATRICES_CSV: tuple[str, ...] = (
    "tensor", "run", "dtype", "shape", "numel", "updated", "sparsity", "nonfinite", "mean_abs_delta",
    "rel_delta_norm", "rank", "max_rank", "rank_ratio", *SPECTRUM_RATIOS, *PRECISION_AND_LINE_CSV, SWEEP_CSV)
MATRICES_ONLY: dict[str, str] = {  # matrices.csv columns that are no table's: what they hold
    "tensor": "the tensor, named as the base stores it",
    "dtype": "the dtype this run was compared with the base in",
    "shape": "the tensor's shape, dimensions joined by x",
    "numel": "parameters compared",
    **{f: f"the {SPECTRUM_WORDS[f]} of Δ itself (not a ratio)" for f in SPECTRUM_RATIOS},
}


def node_columns(run_labels: list[str]) -> list[Column]:
    """The children table's columns: per-run measures once per run, in run order."""
    cols = []
    for m in NODE_MEASURES:
        cols += [m.column(run=label) for label in run_labels] if "{run}" in m.key else [m.column()]
    return cols


def run_columns(sweep: tuple[float, ...]) -> list[Column]:
    """The one-tensor table's columns: the sweep's once per tolerance."""
    cols = []
    for m in RUN_MEASURES:
        cols += [m.column(t=f"{t:g}") for t in sweep] if "{t}" in m.key else [m.column()]
    return cols


def matrices_header(sweep: tuple[float, ...]) -> list[str]:
    """matrices.csv's header: MATRICES_CSV with the sweep's column once per tolerance (the last columns)."""
    return [c for c in MATRICES_CSV if "{t}" not in c] + [sweep_csv(t) for t in sweep]


def matrices_definitions() -> dict[str, str]:
    """What each matrices.csv column holds (the sweep's as `sparsity@{t}`)."""
    by_csv = {m.csv: m.definition for m in RUN_MEASURES if m.csv}
    return {name: by_csv.get(name) or MATRICES_ONLY[name] for name in MATRICES_CSV}


# --------------------------------------------------------------------------------------------------
# The same definitions as text: the help screen and docs/measures.md both use these


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(measures, header: tuple[str, ...] = ("column", "meaning")) -> str:
    """A Markdown table of the columns' titles and definitions (a run's label written RUN, a tolerance t)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in measures:
        c = m.column(run="RUN", t="t")
        lines.append(f"| {_cell(c.title)} | {_cell(c.help)} |")
    return "\n".join(lines)


def readme_table() -> str:
    """docs/measures.md's table of every measure: where it is shown or written and what it is."""
    lines = ["| table header | key (table export) | matrices.csv | applies | definition |", "|---|---|---|---|---|"]
    for where, measures in (("group", NODE_MEASURES), ("tensor", RUN_MEASURES)):
        for m in measures:
            csv = f"`{m.csv}`" if m.csv else ""
            lines.append(f"| {_cell(m.title)} ({where}) | `{m.key}` | {csv} | {m.applies} | {_cell(m.definition)} |")
    for name, meaning in MATRICES_ONLY.items():
        lines.append(f"| | | `{name}` | per run | {_cell(meaning)} |")
    return "\n".join(lines)


README_BEGIN = "<!-- measures: generated by `python -m rlsub_tui.records.measures --readme`; edit measures.py -->"
README_END = "<!-- end of measures -->"


def readme_block() -> str:
    return f"{README_BEGIN}\n{readme_table()}\n{README_END}"


def main(argv: list[str] | None = None) -> int:
    """`python -m rlsub_tui.records.measures --readme [docs/measures.md]`: rewrite that page's table from this registry."""
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "--readme":
        print(readme_table())
        return 0
    path = Path(args[1] if len(args) > 1 else "docs/measures.md")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{path}: cannot be read ({exc.strerror or exc}).", file=sys.stderr)
        return 2
    if README_BEGIN not in text or README_END not in text:
        print(f"{path}: has no generated table of measures (the two marker comments are missing).", file=sys.stderr)
        return 2
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    atomic_write(path, text[:start] + readme_block() + text[end:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
