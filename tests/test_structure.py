"""Rows and columns holding an update, and their uniform-chance level, against numpy on planted masks."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import save

from rlsub_tui.compute.engine import Analysis
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.compute.structure import CodeLines, LineAccumulator
from rlsub_tui.export.outputs import write_outputs
from rlsub_tui.records.criteria import AnalysisOptions, Criterion
from rlsub_tui.records.overlap import touched_chance


def planted_mask(m: int, n: int, rows: int, cols: int, scatter: float, seed: int) -> np.ndarray:
    """Whole rows and whole columns updated, plus a scatter of single updates."""
    g = np.random.default_rng(seed)
    mask = g.random((m, n)) < scatter
    mask[g.choice(m, size=rows, replace=False), :] = True
    mask[:, g.choice(n, size=cols, replace=False)] = True
    return mask


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), chunk=st.integers(1, 200), rows=st.integers(0, 3),
       scatter=st.sampled_from([0.0, 0.001, 0.05]), seed=st.integers(0, 1000))
def test_accumulator_against_numpy(m, n, chunk, rows, scatter, seed):
    mask = planted_mask(m, n, min(rows, m), 0, scatter, seed)
    acc = LineAccumulator((m, n))
    flat = torch.from_numpy(mask.reshape(-1))
    for start in range(0, flat.numel(), chunk):  # chunks that start and end anywhere in a row
        acc.add(flat[start:start + chunk], start)
    counts = acc.finish()
    assert (counts.rows, counts.cols) == (int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum()))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), chunk=st.integers(1, 200), rows=st.integers(0, 3),
       scatter=st.sampled_from([0.0, 0.001, 0.05]), seed=st.integers(0, 1000))
def test_code_lines_against_numpy(m, n, chunk, rows, scatter, seed):
    """Three runs' masks in one code per position (2-bit fields, as the state-code layout's key, plus a bin
    in the high bits): each run's rows and columns, with chunks that start and end anywhere in a row."""
    masks = [planted_mask(m, n, min(rows, m), min(j, n), scatter, seed + j) for j in range(3)]
    g = np.random.default_rng(seed)
    codes = (g.integers(0, 30, (m, n)) << 6).astype(np.int64)
    for j, mask in enumerate(masks):
        codes |= mask * g.integers(1, 4, (m, n)) << 2 * j
    acc = CodeLines((m, n))
    flat = codes.reshape(-1)
    for start in range(0, flat.size, chunk):
        acc.add(flat[start:start + chunk], start)
    for j, mask in enumerate(masks):
        counts = acc.finish(2 * j, 3)
        assert (counts.rows, counts.cols) == (int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum()))


def test_only_matrices():
    assert LineAccumulator((5,)).finish() is None
    assert LineAccumulator((2, 3, 4)).finish() is None


def test_chance_level():
    assert touched_chance(0, 100, 10) == 0.0
    assert touched_chance(100, 100, 10) == 1.0
    assert touched_chance(25, 100, 2) == pytest.approx(1 - 0.75 ** 2)
    assert math.isnan(touched_chance(0, 0, 3))
    # a uniform random mask of that density touches about that share of its rows
    g = np.random.default_rng(0)
    mask = g.random((4000, 50)) < 0.01
    assert mask.any(axis=1).mean() == pytest.approx(touched_chance(int(mask.sum()), mask.size, 50), abs=0.02)


def test_compute_tensor_and_exports_on_planted_rows(tmp_path, monkeypatch):
    """Whole-row updates (neurons) in one matrix, a scatter in another: rows, columns and chance as numpy says,
    in the record, pooled (line-weighted) and in matrices.csv / groups.csv."""
    import rlsub_tui.compute.kernels as kernels

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1000)  # chunks cut rows in the middle
    g = np.random.default_rng(7)
    shapes = {"model.layers.0.mlp.up_proj.weight": (120, 48), "model.layers.0.mlp.down_proj.weight": (48, 120),
              "model.layers.0.input_layernorm.weight": (48,)}
    base = {k: torch.from_numpy((g.standard_normal(s) * 0.02).astype(np.float32)).to(torch.bfloat16)
            for k, s in shapes.items()}
    wanted = {"model.layers.0.mlp.up_proj.weight": planted_mask(120, 48, 9, 0, 0.002, 1),
              "model.layers.0.mlp.down_proj.weight": planted_mask(48, 120, 0, 0, 0.05, 2),
              "model.layers.0.input_layernorm.weight": g.random(48) < 0.5}
    run = {k: torch.where(torch.from_numpy(wanted[k]), base[k] * 2 + 0.5, base[k]) for k in shapes}
    save(base, tmp_path / "base")
    save(run, tmp_path / "run")
    a = Analysis(str(tmp_path / "base"), [str(tmp_path / "run")],
                 AnalysisOptions(criterion=Criterion("exact"), rank=False, use_cache=False))
    result = a.run_all()
    a.close()
    total = {"rows": [0, 0, 0.0], "cols": [0, 0, 0.0]}
    for name, mask in wanted.items():
        s = result.tensors[name].runs[0]
        assert s.updated == int(mask.sum())
        if mask.ndim == 1:
            assert s.rows_updated is None and s.cols_updated is None
            continue
        m, n = mask.shape
        assert (s.rows_updated, s.cols_updated) == (int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum()))
        p = mask.mean()
        for axis, touched, lines, length in (("rows", s.rows_updated, m, n), ("cols", s.cols_updated, n, m)):
            total[axis][0] += lines
            total[axis][1] += touched
            total[axis][2] += lines * (1 - (1 - p) ** length)
    stats = result.stats()
    for axis in ("rows", "cols"):
        share, chance = stats.touched(axis, 0)
        assert share == pytest.approx(total[axis][1] / total[axis][0])
        assert chance == pytest.approx(total[axis][2] / total[axis][0])
    up = result.stats(["model.layers.0.mlp.up_proj.weight"])
    assert up.touched("rows", 0)[0] < 0.5 * up.touched("rows", 0)[1]  # whole neurons: far fewer rows than chance
    write_outputs(result, tmp_path / "out")
    rows = {r["tensor"]: r for r in csv.DictReader(open(tmp_path / "out" / "matrices.csv"))}
    mask = wanted["model.layers.0.mlp.up_proj.weight"]
    row = rows["model.layers.0.mlp.up_proj.weight"]
    assert float(row["row_share"]) == pytest.approx(mask.any(axis=1).mean())
    assert float(row["col_share"]) == pytest.approx(mask.any(axis=0).mean())
    assert float(row["row_share_chance"]) == pytest.approx(1 - (1 - mask.mean()) ** 48)
    assert float(row["col_share_chance"]) == pytest.approx(1 - (1 - mask.mean()) ** 120)
    assert rows["model.layers.0.input_layernorm.weight"]["row_share"] == ""
    groups = {r["group"]: r for r in csv.DictReader(open(tmp_path / "out" / "groups.csv"))}
    assert float(groups["model"]["row_share"]) == pytest.approx(total["rows"][1] / total["rows"][0])


def test_several_runs_each_their_own():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(30, 20, generator=g)
    m1 = torch.zeros(30, 20, dtype=torch.bool)
    m1[3] = True
    m2 = torch.rand(30, 20, generator=g) < 0.1
    comp = compute_tensor(w0, [torch.where(m1, w0 + 1, w0), torch.where(m2, w0 + 1, w0)], Criterion("exact"),
                          want_rank=False)
    assert (comp.runs[0].rows_updated, comp.runs[0].cols_updated) == (1, 20)
    assert (comp.runs[1].rows_updated, comp.runs[1].cols_updated) == (
        int(m2.any(dim=1).sum()), int(m2.any(dim=0).sum()))
