"""One definition per measure: the registry feeds the tables, CSV headers, help and README, and every per-run
figure (one-tensor table, matrices.csv, pooled Stats) agrees with numpy on the same arrays."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from synthetic import base_state, save, sparse_run

from rlsub_tui.cli.main import main
from rlsub_tui.records import measures
from rlsub_tui.records.measures import NODE_MEASURES, RUN_MEASURES
from rlsub_tui.summaries import tables
from rlsub_tui.summaries import tree as explore
from rlsub_tui.ui.dialogs import HELP, keys_markdown

README = Path(__file__).resolve().parent.parent / "docs" / "measures.md"
TOL = 1e-5


def test_readme_table_is_the_registry():
    text = README.read_text(encoding="utf-8")
    assert measures.readme_block() in text, "docs/measures.md's table drifted: run python -m rlsub_tui.records.measures --readme"
    for m in NODE_MEASURES + RUN_MEASURES:  # every measure has its row, with its key
        assert f"| `{m.key}` |" in text


def test_readme_regeneration_rewrites_only_the_table(tmp_path):
    stale = f"intro\n{measures.README_BEGIN}\n| old | table |\n{measures.README_END}\noutro\n"
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert measures.main(["--readme", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == f"intro\n{measures.readme_block()}\noutro\n"
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n", encoding="utf-8")
    assert measures.main(["--readme", str(plain)]) == 2  # refused, and the file left as it was
    assert plain.read_text(encoding="utf-8") == "no markers\n"
    assert measures.main(["--readme", str(tmp_path / "missing.md")]) == 2


def test_help_defines_every_column_of_both_tables():
    for m in NODE_MEASURES + RUN_MEASURES:
        title = m.title.format(run="RUN", t="t").replace("|", "\\|")
        definition = m.definition.format(run="RUN", t="t").replace("|", "\\|")
        assert f"| {title} | {definition} |" in HELP, m.key
    assert "{" not in HELP.split("## Charts")[0], "a template left unfilled in the help"


def test_table_columns_are_the_registry_in_its_order():
    result = SimpleNamespace(run_labels=["a", "b"], sweep=(1e-8, 1e-5))
    cols = tables.table_columns(result)
    keys = [c.key for c in cols]
    assert keys[:9] == ["name", "numel", "mean_sparsity", "jaccard", "jaccard_chance", "jaccard_lift_strat",
                        "consensus", "consensus_chance", "rank"]
    assert keys[9:11] == ["sparsity:a", "sparsity:b"] and [c.title for c in cols[9:11]] == ["sp a", "sp b"]
    assert keys[-1] == "done" and len(keys) == len(NODE_MEASURES) + 1
    run_cols = tables.tensor_columns(result)
    # the most telling first: at 80 columns the run, its sparsity, updated count and rank ratio stay visible
    assert [c.key for c in run_cols][:4] == ["run", "sparsity", "updated", "rank_ratio"]
    assert [c.key for c in run_cols][-2:] == ["sweep:1e-08", "sweep:1e-05"]
    assert [c.title for c in run_cols][-2:] == ["sp@1e-08", "sp@1e-05"]
    assert all(c.help and "{" not in c.help for c in cols + run_cols)


def test_matrices_header_is_the_files_layout():
    # matrices.csv as written since its first version: readers rely on these names
    assert measures.matrices_header((1e-8, 1e-5)) == [
        "tensor", "run", "dtype", "shape", "numel", "updated", "sparsity", "nonfinite", "mean_abs_delta",
        "rel_delta_norm", "rank", "max_rank", "rank_ratio", "stable_rank", "energy_rank_90", "energy_rank_99",
        "effective_rank", "updated_bf16_visible", "hidden_by_bf16", "row_share", "row_share_chance", "col_share",
        "col_share_chance", "true_updated", "true_sparsity", "sparsity@1e-08", "sparsity@1e-05"]
    assert set(measures.matrices_definitions()) == set(measures.MATRICES_CSV)


def test_undefined_fractions_are_nan():
    assert math.isnan(measures.sparsity(0, 0)) and math.isnan(measures.mean_abs_delta(1.0, 0))
    assert math.isnan(measures.rel_delta_norm(1.0, 0.0)) and math.isnan(measures.rank_ratio(None, 4))
    assert math.isnan(measures.rank_ratio(3, None)) and measures.rank_ratio(3, 4) == 0.75
    assert measures.sparsity(1, 4) == 0.75


@pytest.fixture
def analysed(tmp_path):
    base = base_state()
    runs = [sparse_run(base, s) for s in range(2)]
    save(base, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"seed{i}")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "seed0"), str(tmp_path / "seed1"),
                 "--out", str(out), "--quiet", "--no-rank", "--no-cache", "--sweep", "1e-8,1e-5"]) == 0
    return base, runs, out


def numpy_figures(w0: torch.Tensor, w1: torch.Tensor, t: float) -> dict:
    """Per-run figures straight from the arrays: Δ in bf16 (the stored dtype), atol t rounded to bf16."""
    delta = (w1 - w0).float().numpy().astype(np.float64)  # bf16 subtraction, then exact in float64
    t_bf16 = float(torch.tensor(t, dtype=torch.bfloat16).float())
    base = w0.float().numpy().astype(np.float64)
    return {"sparsity": float(np.mean(np.abs(delta) <= t_bf16)),
            "mean_abs_delta": float(np.mean(np.abs(delta))),
            "rel_delta_norm": float(np.linalg.norm(delta) / np.linalg.norm(base))}


def test_per_run_measures_agree_with_numpy_in_every_place(analysed):
    base, runs, out = analysed
    with open(out / "matrices.csv", newline="") as fh:
        rows = {(r["tensor"], r["run"]): r for r in csv.DictReader(fh)}
    for name, w0 in base.items():
        for i, run in enumerate(runs):
            want = numpy_figures(w0, run[name], TOL)
            got = rows[(name, f"seed{i}")]
            for key, value in want.items():
                assert float(got[key]) == pytest.approx(value, rel=1e-6, abs=1e-12), (name, i, key)
            assert float(got["sparsity@1e-05"]) == pytest.approx(want["sparsity"], rel=1e-9)


def test_one_tensor_table_and_pooled_stats_read_the_same_definitions(analysed, tmp_path):
    from rlsub_tui.compute.engine import Analysis
    from rlsub_tui.records.criteria import AnalysisOptions

    base, runs, _ = analysed
    analysis = Analysis(str(tmp_path / "base"), [str(tmp_path / "seed0"), str(tmp_path / "seed1")],
                        AnalysisOptions(sweep=(1e-8, 1e-5), rank=False))
    try:
        for _ in analysis.run():
            pass
    finally:
        analysis.close()
    result = analysis.result
    # every registered column has a value in every row: a measure cannot be registered without its computation
    model = explore.build_tree(result.planned)[0]
    for row in tables.table_rows(model, result):
        assert {c.key for c in tables.table_columns(result)} <= set(row)
    for row in tables.tensor_rows(result.planned[0], result):
        assert {c.key for c in tables.tensor_columns(result)} <= set(row)
    for name, w0 in base.items():
        table = tables.tensor_rows(name, result)
        stats = result.stats([name])
        for i, run in enumerate(runs):
            want = numpy_figures(w0, run[name], TOL)
            assert table[i]["sparsity"] == pytest.approx(want["sparsity"], rel=1e-9)
            assert table[i]["mean_abs_delta"] == pytest.approx(want["mean_abs_delta"], rel=1e-6)
            assert table[i]["rel_delta_norm"] == pytest.approx(want["rel_delta_norm"], rel=1e-6)
            assert stats.sparsity(i) == table[i]["sparsity"]
            assert stats.mean_abs_delta(i) == pytest.approx(table[i]["mean_abs_delta"], rel=1e-12)
            assert stats.relative_norm(i) == pytest.approx(table[i]["rel_delta_norm"], rel=1e-12)
    pooled = result.stats()
    for i, run in enumerate(runs):  # pooled over the model: numel-weighted, from the arrays
        deltas = [(run[n] - base[n]).float().numpy().astype(np.float64).ravel() for n in base]
        bases = [base[n].float().numpy().astype(np.float64).ravel() for n in base]
        d, b = np.concatenate(deltas), np.concatenate(bases)
        t = float(torch.tensor(TOL, dtype=torch.bfloat16).float())
        assert pooled.sparsity(i) == pytest.approx(float(np.mean(np.abs(d) <= t)), rel=1e-9)
        assert pooled.mean_abs_delta(i) == pytest.approx(float(np.mean(np.abs(d))), rel=1e-6)
        assert pooled.relative_norm(i) == pytest.approx(float(np.linalg.norm(d) / np.linalg.norm(b)), rel=1e-6)


def test_help_keys_are_built_from_the_bindings():
    from textual.binding import Binding

    from rlsub_tui.ui.app import ExplorerApp

    table = keys_markdown(ExplorerApp.help_bindings())
    for b in ExplorerApp.BINDINGS:
        assert (b.tooltip or b.description).replace("|", "\\|") in table, b.key
    assert "| ? | anywhere |" in table and "| ] | anywhere | Next chart |" in table
    assert "| h / ← | tree |" in table and "| enter | tree | Focus the node" in table
    assert "| ctrl+p | anywhere | Command palette |" in table
    # a key bound is a key shown: nothing is written by hand
    extra = keys_markdown([("anywhere", [Binding("z", "zap", "Zap", tooltip="Zap the model")])])
    assert extra.splitlines()[2] == "| z | anywhere | Zap the model |"


def test_a_percentage_never_reads_as_an_end_it_is_not():
    """One format for every percentage: more digits near 0% and 100%, bounded where even those round to an end."""
    from rlsub_tui.util.formatting import pct

    assert pct(1.0) == "100.0%" and pct(0.0) == "0.0%" and pct(0.5) == "50.0%"
    assert pct(0.9997) == "99.970%" and pct(0.00054) == "0.054%"
    assert pct(0.9999996) == ">99.999%" and pct(4e-9) == "<0.001%"
    assert pct(float("nan")) == "–" and pct(None) == "–"
