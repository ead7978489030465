"""Writing results: the four output files of `analyze`, table CSVs, and atomic writes for all of them."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

from rlsub_tui.results import AnalysisResult, Stats


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: the old file or the new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def cell(value) -> str | int:
    """A CSV cell: full precision, undefined fractions (NaN) and missing values empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def csv_text(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([cell(v) for v in row])
    return buf.getvalue()


def json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def sweep_label(t: float) -> str:
    return f"sparsity@{t:g}"


def matrices_csv(result: AnalysisResult) -> str:
    header = ["tensor", "run", "dtype", "shape", "numel", "updated", "sparsity", "nonfinite",
              "mean_abs_delta", "rel_delta_norm", "rank", "max_rank", "rank_ratio"]
    header += [sweep_label(t) for t in result.sweep]
    rows = []
    for name in result.planned:
        r = result.tensors.get(name)
        if r is None:
            continue
        for i, s in enumerate(r.runs):
            n = r.numel
            max_rank = r.max_rank if s.rank is not None else None
            row = [name, result.run_labels[i], r.dtype, "x".join(map(str, r.shape)), n, s.updated,
                   1 - s.updated / n if n else math.nan, s.nonfinite,
                   s.sum_abs_delta / n if n else math.nan,
                   math.sqrt(s.sq_delta / s.sq_base) if s.sq_base > 0 else math.nan,
                   s.rank, max_rank, s.rank / max_rank if max_rank else None]
            row += [1 - c / n if n else math.nan for c in s.sweep]
            rows.append(row)
    return csv_text(header, rows)


def pairs_csv(result: AnalysisResult, groups=()) -> str:
    """Per tensor and run pair; group_a, group_b name the runs' groups (empty when a run is in none)."""
    from rlsub_tui.groups import group_of

    header = ["tensor", "run_a", "run_b", "group_a", "group_b", "updated_a", "updated_b", "both", "o1", "o2",
              "o1_random", "o2_random", "jaccard", "jaccard_random"]
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
    header = ["tensor", "numel"] + [f"agree_{j}" for j in range(result.k + 1)] + ["updated_by_2plus", "sign_agree"]
    rows = []
    for name in result.planned:
        r = result.tensors.get(name)
        if r is None:
            continue
        rows.append([name, r.numel] + r.agreement + [r.multi, r.sign_agree])
    return csv_text(header, rows)


def group_rows(result: AnalysisResult) -> tuple[list[str], list[list]]:
    header = ["group", "level", "run", "tensors", "numel", "updated", "sparsity", "mean_rank_ratio"]
    header += [sweep_label(t) for t in result.sweep]
    from rlsub_tui.explore import build_tree

    rows = []
    model, by_type = build_tree(list(result.planned or result.tensors))
    groups = [n for root in (model, by_type) for n in root.walk() if not n.is_tensor and n is not by_type]
    for g in groups:
        s = result.stats(g.tensors)
        for i, label in enumerate(result.run_labels):
            row = [g.key, g.level, label, s.tensors, s.numel, int(s.updated[i]), s.sparsity(i), s.mean_rank_ratio(i)]
            row += [s.sweep_sparsity(i, j) for j in range(len(result.sweep))]
            rows.append(row)
    return header, rows


def groups_csv(result: AnalysisResult) -> str:
    header, rows = group_rows(result)
    return csv_text(header, rows)


def summary_dict(result: AnalysisResult, groups=()) -> dict:
    from rlsub_tui.groups import group_of, group_summary

    s = result.stats()
    owner = group_of(list(groups), result.k)
    runs = []
    for i, label in enumerate(result.run_labels):
        runs.append({
            "label": label, "path": result.run_paths[i], "numel": s.numel, "updated": int(s.updated[i]),
            "sparsity": json_value(s.sparsity(i)), "mean_rank_ratio": json_value(s.mean_rank_ratio(i)),
            "nonfinite": int(s.nonfinite[i]),
            "mean_abs_delta": json_value(s.mean_abs_delta(i)), "rel_delta_norm": json_value(s.relative_norm(i)),
            "sweep": {sweep_label(t): json_value(s.sweep_sparsity(i, j)) for j, t in enumerate(result.sweep)},
        })
    pairs = [{"run_a": result.run_labels[a], "run_b": result.run_labels[b], "group_a": owner[a],
              "group_b": owner[b], **{k: json_value(v) for k, v in p.items()}} for a, b, p in s.pairs()]
    return {
        "base": {"label": result.base_label, "path": result.base_path},
        "criterion": {"name": result.criterion.name,
                      "value": None if result.criterion.name == "exact" else result.criterion.value},
        "sweep": list(result.sweep),
        "device": result.device,
        "complete": result.complete,
        "tensors": s.tensors,
        "runs": runs,
        "pairs": pairs,
        "agreement": [int(x) for x in s.agreement],
        "agreement_chance": [float(x) for x in s.agreement_chance()],
        "consensus": json_value(s.consensus()), "consensus_chance": json_value(s.consensus_chance()),
        "union": json_value(s.union()),
        "sign_agreement": {"updated_by_2plus": s.multi, "same_sign": s.sign_agree,
                           "fraction": json_value(s.sign_agreement())},
        "mean_rank_ratio": json_value(s.mean_rank_ratio_all()),
        "run_groups": group_summary(s, list(groups), result.run_labels) if groups else None,
        "skipped": [{"tensor": k.tensor, "run": k.run, "reason": k.reason} for k in result.skipped],
        "notes": result.notes + sorted({f"{name}: {n}" for name, r in result.tensors.items() for n in r.notes}),
    }


def write_outputs(result: AnalysisResult, out: Path, groups=()) -> list[Path]:
    """Write matrices.csv, pairs.csv, agreement.csv, groups.csv and summary.json into `out`, each atomically.

    Every file is rendered in memory first, so a failure before writing leaves nothing behind.
    Only these names are touched in `out`.
    """
    out = Path(out)
    files = {
        "matrices.csv": matrices_csv(result),
        "pairs.csv": pairs_csv(result, groups),
        "agreement.csv": agreement_csv(result),
        "groups.csv": groups_csv(result),
        "summary.json": json.dumps(summary_dict(result, groups), indent=2, allow_nan=False) + "\n",
    }
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        atomic_write(out / name, text)
        written.append(out / name)
    return written
