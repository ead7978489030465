"""Writing results: the four output files of `analyze`, table CSVs, and atomic writes for all of them."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rlsub_tui import __version__
from rlsub_tui.records import overlap
from rlsub_tui.records.criteria import ULP_LOG2_MAX, ULP_LOG2_MIN
from rlsub_tui.records.measures import (
    GROUP_PRECISION_AND_LINE_CSV,
    matrices_header,
    precision_and_line_figures,
    run_figures,
    sweep_csv,
)
from rlsub_tui.records.results import SPECTRUM_RATIOS, AnalysisResult, Stats
from rlsub_tui.records.subspaces import BASE, SUBSPACES_CSV
from rlsub_tui.records.subspaces import RULES as SUBSPACE_RULES
from rlsub_tui.records.subspaces import SIDES as SUBSPACE_SIDES
from rlsub_tui.util.files import atomic_write

if TYPE_CHECKING:
    from rlsub_tui.records.timelines import TimelineResult

UNITS = ("fractions: sparsity, overlaps, Jaccard, consensus, union, shares of parameters and rank ratios "
         "are in [0, 1] (0.25 = 25%), never percent; counts are numbers of parameters")


def cell(value) -> str | int:
    """A CSV cell: full precision, undefined fractions (NaN) and missing values empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def csv_text(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([cell(v) for v in row])
    return buf.getvalue()


def _fraction(a, b):
    """a / b as summary.json writes it: null where the fraction is undefined (b = 0)."""
    return json_value(overlap.ratio(a, b))


def json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def sweep_label(t: float) -> str:
    return sweep_csv(t)


def criterion_dict(result: AnalysisResult) -> dict:
    c = result.criterion
    return {"name": c.name, "value": None if c.name == "exact" else c.value}


def updated_when(result: AnalysisResult) -> str:
    """The criterion in words, for every pair (each in its own comparison dtype: see run_provenance)."""
    return _rule(result, "the pair's comparison dtype")


def _rule(result: AnalysisResult, dtype: str) -> str:
    c = result.criterion
    rule = {"atol": f"|Δ| > {c.value:g} with both values in {dtype} and Δ computed there (the tolerance rounded "
                    "to that dtype)",
            "exact": f"the values differ in {dtype}",
            "relative": f"|Δ| > {c.value:g}·max(|w0|, |w1|) of the values in {dtype}, computed in float32"}[c.name]
    return f"a parameter counts as updated when {rule}; NaN/Inf in either checkpoint counts as updated"


def run_provenance(result: AnalysisResult, s: Stats, i: int) -> dict:
    """Run i as compared: the dtype(s) its pair with the base was compared in, the criterion for that pair, and
    where its true updates (true_updated, true_sparsity, hidden_by_bf16) were counted."""
    compared = sorted(s.compared_dtypes[i])
    true_in = sorted(s.true_dtypes[i])
    dtype = compared[0] if len(compared) == 1 else (" or ".join(compared) + " by tensor (matrices.csv `dtype`)"
                                                   if compared else "the pair's comparison dtype")
    out = {"compare_dtype": "/".join(compared) or None, "updated_when": _rule(result, dtype),
           "true_updates_in": "/".join(true_in) or None}
    if true_in:
        out["true_updated_when"] = (_rule(result, "/".join(true_in)) + " (the stored precision: the base cast up "
                                    "exactly; whatever the comparison dtype)")
    return out


def provenance(result: AnalysisResult, shows: str, tensors: list[str], columns: dict[str, str],
               filter_text: str = "", timeline: TimelineResult | None = None) -> dict:
    """What an exported table or chart holds and how it was computed: written beside it as NAME.json; with a
    timeline, also every step's checkpoint and the step gap."""
    done = sum(1 for t in tensors if t in result.tensors)
    pooled = result.stats(tensors)
    return {
        "written_by": f"rlsub-tui {__version__}",
        "shows": shows,
        "filter": ({"tensor_name_contains": filter_text, "note": "only tensors whose name contains this "
                    "text are in the rows and pooled numbers"} if filter_text else None),
        "tensors": len(tensors), "tensors_computed": done, "complete": done == len(tensors),
        "criterion": criterion_dict(result),
        "updated_when": updated_when(result),
        "sweep": list(result.sweep),
        "base": {"label": result.base_label, "path": result.base_path},
        "compare_dtype": result.compare_dtype,
        "runs": [{"number": i + 1, "label": lbl, "path": path, **run_provenance(result, pooled, i)}
                 for i, (lbl, path) in enumerate(zip(result.run_labels, result.run_paths))],
        "units": UNITS,
        "columns": columns,
        **({"timeline": timeline_provenance(timeline)} if timeline is not None else {}),
    }


def timeline_provenance(timeline: TimelineResult) -> dict:
    """The timeline's runs, each step with its checkpoint's path, the step gap and how pairs were compared."""
    return {"step_gap": timeline.gap, "compare_dtype": timeline.compare_dtype,
            "runs": [{"label": run.label, "path": run.path,
                      "steps": [{"step": step, "path": path} for step, path in zip(run.steps, run.step_paths)]}
                     for run in timeline.runs]}


def sidecar_path(csv_path: Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def view_export_path(folder: Path, node_key: str, what: str, filter_text: str = "") -> Path:
    """Where the explorer writes what it shows: rlsub-NODE-WHAT[-filter_TEXT]-STAMP[-N].csv in `folder`, a name
    that neither a CSV nor a sidecar there has yet."""
    if filter_text:
        what += "-filter_" + (_slug(filter_text) or "text")
    stem = f"rlsub-{_slug(node_key)}-{what}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, n = Path(folder) / f"{stem}.csv", 2
    while path.exists() or sidecar_path(path).exists():
        path, n = Path(folder) / f"{stem}-{n}.csv", n + 1
    return path


def write_view_export(path: Path, text: str, meta: dict) -> None:
    """The CSV and, beside it, NAME.json saying what it shows and how it was computed; each atomic, and no
    sidecar left without its CSV. Raises OSError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(sidecar_path(path), json.dumps(meta, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
        atomic_write(path, text)
    except OSError:
        if not path.exists():
            sidecar_path(path).unlink(missing_ok=True)
        raise


def matrices_csv(result: AnalysisResult) -> str:
    """One row per tensor and run: the columns of measures.MATRICES_CSV, the figures of measures.run_figures."""
    header = matrices_header(result.sweep)
    fixed = header[:len(header) - len(result.sweep)]  # the sweep's columns come last
    rows = []
    for name in result.planned:
        r = result.tensors.get(name)
        if r is None:
            continue
        one = Stats.of([r], result.k)
        for i, s in enumerate(r.runs):
            figures = run_figures(r, s)
            figures.update(precision_and_line_figures(one, i))
            figures.update({"tensor": name, "run": result.run_labels[i], "dtype": s.dtype or r.dtype,
                            "shape": "x".join(map(str, r.shape)), "numel": r.numel})
            rows.append([figures[c] for c in fixed] + figures["sweep"])
    return csv_text(header, rows)


def ulp_histogram_dict(s: Stats, i: int) -> dict:
    """Run i's true updates per bin of floor(log2(|Δ| / ULP_bf16(w0))), the end bins open."""
    return {"log2_ulp": list(range(ULP_LOG2_MIN, ULP_LOG2_MAX + 1)),
            "true_updates": [int(c) for c in s.ulp_histogram[i]]}


def pairs_csv(result: AnalysisResult, groups=()) -> str:
    """Per tensor and run pair; group_a, group_b name the runs' groups (empty when a run is in none)."""
    from rlsub_tui.summaries.groups import group_of

    header = ["tensor", "run_a", "run_b", "group_a", "group_b", "updated_a", "updated_b", "both", "o1", "o2",
              "o1_random", "o2_random", "jaccard", "jaccard_random",
              "o1_random_strat", "o2_random_strat", "jaccard_random_strat"]
    owner = group_of(list(groups), result.k)
    rows = []
    for name in result.planned:
        r = result.tensors.get(name)
        if r is None:
            continue
        stats = Stats.of([r], result.k)
        for a, b, p in stats.pairs():
            rows.append([name, result.run_labels[a], result.run_labels[b], owner[a], owner[b]]
                        + [p[c] for c in header[5:]])
    return csv_text(header, rows)


def agreement_csv(result: AnalysisResult) -> str:
    """Per tensor: the observed histogram, both chance histograms (expected counts) and consensus chances."""
    js = range(result.k + 1)
    header = (["tensor", "numel"] + [f"agree_{j}" for j in js] + ["updated_by_2plus", "sign_agree"]
              + [f"chance_{j}" for j in js] + [f"chance_strat_{j}" for j in js]
              + ["consensus_chance", "consensus_chance_strat"])
    rows = []
    for name in result.planned:
        r = result.tensors.get(name)
        if r is None:
            continue
        s = Stats.of([r], result.k)
        rows.append([name, r.numel] + r.agreement + [r.multi, r.sign_agree]
                    + [float(x) for x in s.agreement_chance()] + [float(x) for x in s.agreement_chance_strat()]
                    + [s.consensus_chance(), s.consensus_chance_strat()])
    return csv_text(header, rows)


def group_rows(result: AnalysisResult) -> tuple[list[str], list[list]]:
    header = ["group", "level", "run", "tensors", "numel", "updated", "sparsity", "mean_rank_ratio"]
    header += [f"mean_{f}_ratio" for f in SPECTRUM_RATIOS]
    header += GROUP_PRECISION_AND_LINE_CSV  # true updates, bf16 visibility, rows and columns (docs/measures.md)
    header += ["jaccard", "jaccard_random", "jaccard_random_strat", "jaccard_lift_strat"]  # the group's, every row
    header += [sweep_label(t) for t in result.sweep]
    from rlsub_tui.summaries.tree import build_tree

    rows = []
    model, by_type = build_tree(list(result.planned or result.tensors))
    groups = [n for root in (model, by_type) for n in root.walk() if not n.is_tensor and n is not by_type]
    for g in groups:
        s = result.stats(g.tensors)
        (jaccard, jaccard_random), jaccard_strat = s.mean_jaccard(), s.mean_jaccard_chance_strat()
        for i, label in enumerate(result.run_labels):
            row = [g.key, g.level, label, s.tensors, s.numel, int(s.updated[i]), s.sparsity(i), s.mean_rank_ratio(i)]
            row += [s.mean_spectrum_ratio(f, i) for f in SPECTRUM_RATIOS]
            figures = precision_and_line_figures(s, i)
            row += [figures[k] for k in GROUP_PRECISION_AND_LINE_CSV]
            row += [jaccard, jaccard_random, jaccard_strat, overlap.lift(jaccard, jaccard_strat)]
            row += [s.sweep_sparsity(i, j) for j in range(len(result.sweep))]
            rows.append(row)
    return header, rows


def groups_csv(result: AnalysisResult) -> str:
    header, rows = group_rows(result)
    return csv_text(header, rows)


def summary_dict(result: AnalysisResult, groups=()) -> dict:
    from rlsub_tui.summaries.groups import group_of, group_summary

    s = result.stats()
    owner = group_of(list(groups), result.k)
    runs = []
    for i, label in enumerate(result.run_labels):
        runs.append({
            "label": label, "path": result.run_paths[i], **run_provenance(result, s, i),
            "read_as": result.run_read_as[i] if i < len(result.run_read_as) else None,
            "numel": s.numel, "updated": int(s.updated[i]),
            "sparsity": json_value(s.sparsity(i)), "mean_rank_ratio": json_value(s.mean_rank_ratio(i)),
            "nonfinite": int(s.nonfinite[i]),
            **{f"mean_{f}_ratio": json_value(s.mean_spectrum_ratio(f, i)) for f in SPECTRUM_RATIOS},
            "mean_abs_delta": json_value(s.mean_abs_delta(i)), "rel_delta_norm": json_value(s.relative_norm(i)),
            "sweep": {sweep_label(t): json_value(s.sweep_sparsity(i, j)) for j, t in enumerate(result.sweep)},
            **{k: json_value(v) for k, v in precision_and_line_figures(s, i).items()},
            "distance_to_bf16_visibility": ulp_histogram_dict(s, i),
        })
    pairs = [{"run_a": result.run_labels[a], "run_b": result.run_labels[b], "group_a": owner[a],
              "group_b": owner[b], **{k: json_value(v) for k, v in p.items()}} for a, b, p in s.pairs()]
    return {
        "base": {"label": result.base_label, "path": result.base_path},
        "written_by": f"rlsub-tui {__version__}",
        "units": UNITS,
        "criterion": criterion_dict(result),
        "updated_when": updated_when(result),
        "sweep": list(result.sweep),
        "compare_dtype": result.compare_dtype,
        "device": result.device,
        "complete": result.complete,
        "tensors": s.tensors,
        "runs": runs,
        "pairs": pairs,
        "agreement": [int(x) for x in s.agreement],
        "agreement_chance": [float(x) for x in s.agreement_chance()],
        "agreement_chance_strat": [float(x) for x in s.agreement_chance_strat()],
        "consensus": json_value(s.consensus()), "consensus_chance": json_value(s.consensus_chance()),
        "consensus_chance_strat": json_value(s.consensus_chance_strat()),
        "union": json_value(s.union()),
        "sign_agreement": {"updated_by_2plus": s.multi, "same_sign": s.sign_agree,
                           "fraction": json_value(s.sign_agreement()),
                           "chance": json_value(s.sign_agreement_chance())},
        "mean_rank_ratio": json_value(s.mean_rank_ratio_all()),
        **{f"mean_{f}_ratio": json_value(s.mean_spectrum_ratio(f)) for f in SPECTRUM_RATIOS},
        "directions": directions_summary(result, s),
        "run_groups": group_summary(s, list(groups), result.run_labels) if groups else None,
        "skipped": [{"tensor": k.tensor, "run": k.run, "reason": k.reason} for k in result.skipped],
        "tied": [{"alias": a, "counted_as": p} for a, p in result.tied.items()],
        "notes": result.notes + sorted({f"{name}: {n}" for name, r in result.tensors.items() for n in r.notes}),
    }


TIMELINE_COLUMNS = ["tensor", "run", "step", "prev_step", "numel", "updated_vs_base", "updated_vs_prev",
                    "overlap_prev", "union_so_far", "patch_bytes", "dense_bytes", "overlap_prev_random"]


def timeline_csv(timeline: TimelineResult) -> str:
    """One row per tensor, timeline run and step (a timeline.TimelineResult)."""
    rows = [[getattr(r, c) for c in TIMELINE_COLUMNS] for r in timeline.rows]
    return csv_text(TIMELINE_COLUMNS, rows)


def timeline_summary(timeline: TimelineResult) -> list[dict]:
    """Per timeline run: every step pooled over tensors, and the step at which parameters first changed."""
    out = []
    by_step: dict[tuple[str, int], list] = {}
    for r in timeline.rows:
        by_step.setdefault((r.run, r.step), []).append(r)
    for run in timeline.runs:
        per_step = []
        for step in run.steps:
            rows = by_step[(run.label, step)]
            n = sum(r.numel for r in rows)
            has_prev = rows[0].prev_step is not None
            has_overlap = rows[0].both_prev is not None
            upd_prev = sum(r.updated_vs_prev for r in rows) if has_prev else None
            patch = sum(r.patch_bytes for r in rows) if has_prev else None
            dense = sum(r.dense_bytes for r in rows)
            per_step.append({
                "step": step, "prev_step": rows[0].prev_step, "numel": n,
                "updated_vs_base": sum(r.updated_vs_base for r in rows),
                "sparsity_vs_base": 1 - sum(r.updated_vs_base for r in rows) / n if n else None,
                "updated_vs_prev": upd_prev,
                "sparsity_vs_prev": 1 - upd_prev / n if has_prev and n else None,
                "overlap_prev": _fraction(sum(r.both_prev for r in rows), upd_prev) if has_overlap else None,
                "overlap_prev_random": _fraction(sum(r.prev_updated for r in rows), n) if has_overlap else None,
                "union_so_far": sum(r.union_so_far for r in rows),
                "union_density": _fraction(sum(r.union_so_far for r in rows), n),
                "patch_bytes": patch, "dense_bytes": dense,
                "patch_ratio": _fraction(patch, dense) if has_prev else None,
            })
        first = {str(s): int(c) for s, c in zip(run.steps, run.first_changed[1:])}
        first["never"] = int(run.first_changed[0])
        out.append({"label": run.label, "path": run.path, "steps": run.steps, "step_gap": timeline.gap,
                    "compare_dtype": timeline.compare_dtype,
                    "per_step": per_step, "first_changed": first})
    return out


def subspaces_csv(result: AnalysisResult) -> str:
    """Per matrix, pair of runs (or run and base), side and k: the overlap of their top-k subspaces."""
    labels = result.run_labels
    rows = []
    for name in result.planned:
        r = result.tensors.get(name)
        if r is None:
            continue
        for row in r.subspace_rows():
            rows.append([name, labels[row.a], "base" if row.b == BASE else labels[row.b], row.side, row.rule,
                         row.k, row.overlap, row.chance, row.lift])
    return csv_text(list(SUBSPACES_CSV), rows)


def directions_summary(result: AnalysisResult, s: Stats) -> dict | None:
    """Pooled over the matrices (k-weighted): per side and k rule, the runs' pairs' mean overlap and chance, each
    pair's, and each run's with the base; None when no subspace was computed."""
    if not s.subspaces.sums:
        return None
    labels, out = result.run_labels, {}
    for rule in SUBSPACE_RULES:
        entry = {}
        for side in SUBSPACE_SIDES:
            ov, ch = s.subspaces.figure(side, rule)
            bov, bch = s.subspaces.figure(side, rule, base=True)
            entry[side] = {
                "pairs": {"overlap": json_value(ov), "chance": json_value(ch), "lift": json_value(overlap.lift(ov, ch))},
                "with_base": {"overlap": json_value(bov), "chance": json_value(bch),
                              "lift": json_value(overlap.lift(bov, bch))},
                "per_pair": [{"run_a": labels[a], "run_b": labels[b],
                              **dict(zip(("overlap", "chance"), map(json_value, s.subspaces.pair(a, b, side, rule))))}
                             for a in range(result.k) for b in range(a + 1, result.k)],
                "per_run_with_base": [{"run": labels[a], **dict(zip(("overlap", "chance"),
                                                                     map(json_value, s.subspaces.pair(a, BASE, side, rule))))}
                                      for a in range(result.k)],
            }
        out[rule] = entry
    return out


def write_outputs(result: AnalysisResult, out: Path, timeline=None, groups=()) -> list[Path]:
    """Write matrices.csv, pairs.csv, agreement.csv, groups.csv, subspaces.csv and summary.json into `out`, each
    atomically;
    with a timeline (timeline.TimelineResult), also timeline.csv and summary.json's `timelines`.

    Every file is rendered in memory first, so a failure before writing leaves nothing behind.
    Only these names are touched in `out`.
    """
    out = Path(out)
    summary = summary_dict(result, groups)
    if timeline is not None:
        summary["timelines"] = timeline_summary(timeline)
    files = {
        "matrices.csv": matrices_csv(result),
        "pairs.csv": pairs_csv(result, groups),
        "agreement.csv": agreement_csv(result),
        "groups.csv": groups_csv(result),
        "subspaces.csv": subspaces_csv(result),
        "summary.json": json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
    }
    if timeline is not None:
        files["timeline.csv"] = timeline_csv(timeline)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        atomic_write(out / name, text)
        written.append(out / name)
    return written
