"""Runs stored finer than bf16 against a bf16 base: the first screen and every file say which precision each figure
is in, and show the true updates without any flag (numbers against numpy)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from synthetic import base_state, save, sparse_run
from test_timeline import write_timeline
from test_ui import settle

from rlsub_tui.cli.main import main
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
from rlsub_tui.ui.summary import SummaryStrip
from rlsub_tui.util.formatting import pct


def fp32_runs(tmp_path):
    """A bf16 base, two fp32 seeds that start from it (half their steps below half a bf16 ULP) and a bf16 seed."""
    b = base_state(3)
    save(b, tmp_path / "base")
    for seed in (1, 2):
        up = {n: w.float() for n, w in b.items()}
        small = sparse_run(up, 10 + seed, density=0.4, scale=1e-5)  # mostly hidden by bf16
        save(sparse_run(small, 20 + seed, density=0.05, scale=1e-2), tmp_path / f"fp32-seed{seed}")
    save(sparse_run(b, 3), tmp_path / "bf16-seed3")
    return b


def numpy_true_and_hidden(tmp_path, b, run: str) -> tuple[float, float]:
    """True sparsity (fp32, |Δ| > 1e-5 against the bf16 base cast up) and the share bf16 hides, in numpy."""
    from safetensors.numpy import load_file

    state = load_file(str(tmp_path / run / "model.safetensors"))
    true = hidden = n = 0
    for name, w1 in state.items():
        w0 = b[name].float().numpy()
        t = np.abs(w1 - w0) > np.float32(1e-5)
        bits0, bits1 = w0.view(np.uint32).astype(np.uint64), w1.view(np.uint32).astype(np.uint64)
        r0 = ((bits0 + 0x7FFF + ((bits0 >> 16) & 1)) >> 16).astype(np.uint32)  # round to nearest even bf16
        r1 = ((bits1 + 0x7FFF + ((bits1 >> 16) & 1)) >> 16).astype(np.uint32)
        true, hidden, n = true + int(t.sum()), hidden + int((t & (r0 == r1)).sum()), n + t.size
    return 1 - true / n, hidden / true


async def test_the_first_screen_shows_true_and_bf16_visible_sparsity(tmp_path):
    b = fp32_runs(tmp_path)
    app = ExplorerApp(ExplorerConfig(str(tmp_path / "base"), [str(tmp_path / r) for r in
                                                              ("fp32-seed1", "fp32-seed2", "bf16-seed3")],
                                     AnalysisOptions(rank=False, use_cache=False), tmp_path / "exports"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        lines = app.query_one(SummaryStrip).lines
    assert lines[0].startswith("sparsity in bf16 ")  # the headline figure says its dtype
    assert lines[1].startswith("true sp") and " fp32 " in lines[1] and "hid" in lines[1]
    assert "(c: " in lines[1] and "fp32)" in lines[1]  # the other precision, one key away
    true_part, hidden_part = re.split(r"hid(?:den by)? bf16", lines[1])
    cells, hidden_cells = dict(re.findall(r"(\d):(\S+%)", true_part)), dict(re.findall(r"(\d):(\S+%)", hidden_part))
    assert set(cells) == {"1", "2"}  # the bf16 run has no true updates of its own to show
    for i, run in ((1, "fp32-seed1"), (2, "fp32-seed2")):
        true_sp, hidden = numpy_true_and_hidden(tmp_path, b, run)
        assert cells[str(i)] == pct(true_sp) and hidden_cells[str(i)] == pct(hidden)
        assert hidden > 0.3  # the fixture hides a large share: a wrong count would show


def test_every_file_says_how_each_pair_was_compared(tmp_path, capsys):
    """summary.json and each sidecar: every run's comparison dtype, an updated_when true for its pair, and where
    its true updates were counted; matrices.csv holds true_updated per tensor, equal to numpy's."""
    from safetensors.numpy import load_file

    b = fp32_runs(tmp_path)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "fp32-seed1"), str(tmp_path / "bf16-seed3"),
                 "--out", str(out), "--quiet", "--no-rank", "--no-cache"]) == 0
    report = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    fp32, bf16 = summary["runs"]
    assert fp32["compare_dtype"] == "bf16" and fp32["true_updates_in"] == "fp32"
    assert "in bf16" in fp32["updated_when"] and "in fp32" in fp32["true_updated_when"]
    assert bf16["compare_dtype"] == "bf16" and bf16["true_updates_in"] is None and "true_updated_when" not in bf16
    true_sp, hidden = numpy_true_and_hidden(tmp_path, b, "fp32-seed1")
    assert fp32["true_sparsity"] == pytest.approx(true_sp) and fp32["hidden_by_bf16"] == pytest.approx(hidden)
    assert bf16["true_sparsity"] is None
    row = next(line for line in report.splitlines() if line.startswith("fp32-seed1 "))
    assert row.split()[1] == "bf16" and pct(true_sp) in row.split() and pct(hidden) in row.split()
    state = load_file(str(tmp_path / "fp32-seed1" / "model.safetensors"))
    with open(out / "matrices.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["run"] == "fp32-seed1":
                w0 = b[r["tensor"]].float().numpy()
                assert int(r["true_updated"]) == int((np.abs(state[r["tensor"]] - w0) > np.float32(1e-5)).sum())
    groups = list(csv.DictReader(open(out / "groups.csv", newline="")))
    pairs = list(csv.DictReader(open(out / "pairs.csv", newline="")))
    model = next(g for g in groups if g["level"] == "model")
    assert pairs and float(model["jaccard_lift_strat"]) == pytest.approx(
        float(model["jaccard"]) / float(model["jaccard_random_strat"]))
    assert float(model["jaccard"]) == pytest.approx(summary["pairs"][0]["jaccard"])
    assert float(model["jaccard_random_strat"]) == pytest.approx(summary["pairs"][0]["jaccard_random_strat"])


async def test_the_timeline_export_names_each_step_and_its_columns(tmp_path):
    b = base_state(4)
    save(b, tmp_path / "base")
    states, cur = [], b
    for i in range(3):
        cur = sparse_run(cur, 50 + i, density=0.2)
        states.append(cur)
    write_timeline(tmp_path / "seed1", states, [10, 20, 30])
    from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs

    resolved = resolve_runs([str(tmp_path / "seed1")])
    app = ExplorerApp(ExplorerConfig(str(tmp_path / "base"), run_specs(resolved),
                                     AnalysisOptions(rank=False, use_cache=False), tmp_path / "exports",
                                     timelines=resolved.timelines))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.pause(0.5)
        await pilot.press("t")
        await pilot.pause()
        await pilot.press("x")
        await pilot.pause()
        path = app.last_export
    header = next(csv.reader(open(path, newline="")))
    assert header == ["step", "seed1 sparsity vs base", "seed1 sparsity vs step", "seed1 union density"]
    meta = json.loads(path.with_suffix(".json").read_text())
    assert all(meta["columns"][c] for c in header)
    tl = meta["timeline"]
    assert tl["step_gap"] == 1 and tl["compare_dtype"] == "stored"
    assert [(s["step"], s["path"]) for s in tl["runs"][0]["steps"]] == [
        (s, str(tmp_path / "seed1" / f"checkpoint-{s}")) for s in (10, 20, 30)]


def test_the_cli_bars_say_what_each_pass_counts_and_the_patch_figure_is_explained(tmp_path, capsys):
    b = base_state(4)
    save(b, tmp_path / "base")
    states, cur = [], b
    for i in range(2):
        cur = sparse_run(cur, 60 + i, density=0.9)  # most entries change: the patch outgrows the dense tensor
        states.append(cur)
    write_timeline(tmp_path / "seed1", states, [10, 20])
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "seed1"), "--out", str(tmp_path / "out"),
                 "--no-rank", "--no-cache"]) == 0
    captured = capsys.readouterr()
    bars = [line for line in captured.err.splitlines() if "tensors" in line and "━" in line]
    assert any(line.startswith("runs vs base ") for line in bars), bars
    assert any(line.startswith("timeline steps vs base, prev ") for line in bars), bars
    ratios = [float(x) for x in re.findall(r"(\d+\.\d)%\s*$", captured.out, re.MULTILINE)]
    assert max(ratios) > 100  # the fixture's patch/dense exceeds 100% ...
    assert "patch/dense: bytes of a lossless sparse patch" in captured.out  # ... and the report says why
    assert "above 100% when more than a third" in captured.out
