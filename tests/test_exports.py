"""Every exported file says what it shows: plain numbers, fractions, the filter, the criterion and the runs."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import threading

import numpy as np
import pytest
from test_ui import make_app, settle

from rlsub_tui.cli.main import main
from rlsub_tui.export.outputs import cell, sidecar_path
from rlsub_tui.util.files import atomic_write


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_numpy_scalars_are_written_as_plain_numbers():
    assert cell(np.float64(100.0)) == "100.0"
    assert cell(np.float32(0.25)) == "0.25"
    assert cell(np.int64(7)) == 7
    assert cell(np.float64("nan")) == ""


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.csv", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == 0o666 & ~umask


def test_analyze_files_are_readable_by_the_group_under_umask_022(checkpoints, capsys):
    old = os.umask(0o022)
    try:
        assert main(["analyze", str(checkpoints / "base"), str(checkpoints / "seed0"), "--out",
                     str(checkpoints / "out"), "--quiet", "--no-rank"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (checkpoints / "out").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


async def test_magnitude_chart_csv_holds_numbers(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("6", "x")
        rows = read_csv(app.last_export)
        assert rows[0] == ["log2 |w0|", "seed0", "seed1", "seed2"]
        text = app.last_export.read_text()
        assert "np." not in text
        s = app.result.stats()
        for row in rows[1:]:
            values = [float(v) for v in row]  # every cell is a plain number
            b = int(values[0]) + 25 + 1  # back to the bin index (MAG_X_MIN = -25)
            for i in range(3):  # a fraction: updated in the bin / parameters in the bin
                assert values[1 + i] == pytest.approx(s.magnitude_updated[i, b] / s.magnitude_numel[b])
                assert 0.0 <= values[1 + i] <= 1.0


async def test_exports_record_criterion_runs_paths_and_column_meanings(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("e")
        meta = json.loads(sidecar_path(app.last_export).read_text())
        assert meta["criterion"] == {"name": "atol", "value": 1e-5}
        assert "|Δ| > 1e-05" in meta["updated_when"]
        assert meta["sweep"] == [1e-8, 1e-5]
        assert meta["base"]["path"] == str(checkpoints / "base")
        assert [(r["number"], r["label"], r["path"]) for r in meta["runs"]] == [
            (i + 1, f"seed{i}", str(checkpoints / f"seed{i}")) for i in range(3)]
        assert meta["filter"] is None and meta["complete"] is True
        assert "fractions" in meta["units"]
        header = read_csv(app.last_export)[0]
        assert set(meta["columns"]) == set(header) and all(meta["columns"].values())
        mode = stat.S_IMODE(app.last_export.stat().st_mode)
        assert mode == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


async def test_overlap_chart_csv_names_runs_and_the_metric(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("2", "x")
        rows = read_csv(app.last_export)
        assert rows[0] == ["run_a", "run_b", "o1", "o1_random", "o1_random_strat", "lift", "lift_strat"]
        s = app.result.stats()
        for row in rows[1:]:
            a, b = int(row[0][-1]), int(row[1][-1])
            both, ua, ub = int(s.both[a, b]), int(s.updated[a]), int(s.updated[b])
            assert float(row[2]) == pytest.approx(both / ua) and float(row[3]) == pytest.approx(ub / s.numel)
            assert float(row[6]) == pytest.approx(float(row[2]) / float(row[4]))  # o1 over its stratified chance
        assert [r[:2] for r in rows[1:]] == [["seed0", "seed1"], ["seed0", "seed2"], ["seed1", "seed2"]]
        meta = json.loads(sidecar_path(app.last_export).read_text())
        assert "|A∩B|/|A|" in meta["columns"]["o1"]
        await pilot.press("o", "x")
        rows = read_csv(app.last_export)
        assert rows[0] == ["run_a", "run_b", "jaccard", "jaccard_random", "jaccard_random_strat", "lift", "lift_strat"]
        a, b = 0, 1
        both, ua, ub = int(s.both[a, b]), int(s.updated[a]), int(s.updated[b])
        assert float(rows[1][2]) == pytest.approx(both / (ua + ub - both))


async def test_filtered_export_says_it_is_filtered(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"q_proj", "enter")
        await pilot.press("e")
        path = app.last_export
        assert "filter_q_proj" in path.name
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["filter"]["tensor_name_contains"] == "q_proj"
        assert meta["tensors"] == 2  # of 21: the two layers' q_proj
        assert "filter 'q_proj'" in meta["shows"]
        toast = [n.message for n in app._notifications][-1]
        assert "Filtered" in toast and "q_proj" in toast


async def test_export_after_cancel_says_what_is_missing(checkpoints, monkeypatch):
    import rlsub_tui.compute.engine as engine

    gate = threading.Event()
    real = engine.compute_tensor
    calls = {"n": 0}

    def gated(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            gate.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(engine, "compute_tensor", gated)
    app = make_app(checkpoints, use_cache=False)
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(100):
            await pilot.pause(0.05)
            if calls["n"] > 2:
                break
        await pilot.press("escape")
        gate.set()
        await settle(app, pilot)
        assert 0 < len(app.result.tensors) < len(app.result.planned)
        # a node with nothing computed: no file, and a message saying why
        missing = next(n for n in app.roots[0].children if not any(t in app.result.tensors for t in n.tensors))
        app.focus_node = missing
        app._show_focus()
        before = set((checkpoints / "exports").glob("*")) if (checkpoints / "exports").exists() else set()
        await pilot.press("e")
        after = set((checkpoints / "exports").glob("*")) if (checkpoints / "exports").exists() else set()
        assert after == before
        assert "Nothing computed yet" in [n.message for n in app._notifications][-1]
        # the whole model, partly computed: written, and both the file and the message say partial
        app.focus_node = app.roots[0]
        app._show_focus()
        await pilot.press("e")
        meta = json.loads(sidecar_path(app.last_export).read_text())
        assert meta["complete"] is False
        assert meta["tensors_computed"] == len(app.result.tensors) < meta["tensors"]
        toast = [n for n in app._notifications][-1]
        assert "Partial" in toast.message and toast.severity == "warning"


def test_summary_json_states_units_and_sign_chance(checkpoints, capsys):
    out = checkpoints / "out"
    assert main(["analyze", str(checkpoints / "base"), *(str(checkpoints / f"seed{i}") for i in range(3)),
                 "--out", str(out), "--quiet", "--no-rank"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "fractions" in summary["units"]
    # independent of our code: from agreement.csv, each parameter updated by j >= 2 runs has all
    # signs equal with chance 2^(1-j) when every sign is a fair coin
    rows = list(csv.DictReader(open(out / "agreement.csv")))
    num = sum(int(r[f"agree_{j}"]) * 2.0 ** (1 - j) for r in rows for j in (2, 3))
    den = sum(int(r[f"agree_{j}"]) for r in rows for j in (2, 3))
    assert summary["sign_agreement"]["chance"] == pytest.approx(num / den)
    assert den == summary["sign_agreement"]["updated_by_2plus"]
    text = capsys.readouterr().out
    assert f"vs {100 * num / den:.1f}% if signs were coin flips" in text
    assert not math.isnan(summary["sign_agreement"]["fraction"])
