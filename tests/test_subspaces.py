"""Subspace overlap of the runs' top singular directions, against numpy's SVD: planted subspaces (identical,
orthogonal, shared at a known angle), a stack of experts, the bundled seeds, and the files that carry it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlsub_tui.checkpoints.sample_paths import sample_dir
from rlsub_tui.cli.main import main
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.records.criteria import AnalysisOptions, Criterion
from rlsub_tui.records.results import TensorResult
from rlsub_tui.records.subspaces import BASE, SubspaceRow

# how far an overlap may sit from numpy's float64 SVD on real updates: the directions come from the float64 Gram
# (its eigenvectors' error grows as σ₁²/gap in σ²) and float32 products; measured up to 1.2e-4 on the sample at a
# k that cuts through a cluster of singular values
TOLERANCE = 1e-3


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


_SVD: dict[int, tuple] = {}


def _svd(x: np.ndarray) -> tuple:
    """numpy's float64 SVD, kept while the array lives (one per matrix, however many rows ask)."""
    key = id(x)
    if key not in _SVD or _SVD[key][0] is not x:
        _SVD[key] = (x, np.linalg.svd(x, full_matrices=False))
    return _SVD[key][1]


def numpy_overlap(da: np.ndarray, db: np.ndarray, side: str, k: int) -> float:
    """‖A_kᵀB_k‖_F²/k of the top-k singular vectors, from numpy's float64 SVD."""
    (ua, _, va), (ub, _, vb) = _svd(da), _svd(db)
    a, b = (ua[:, :k], ub[:, :k]) if side == "left" else (va[:k].T, vb[:k].T)
    return float(np.sum((a.T @ b) ** 2) / k)


def rows_of(record) -> dict:
    return {(r.a, r.b, r.side, r.rule): r for r in map(SubspaceRow.from_list, record.subspaces)}


def planted(m=96, n=64, k=8, angle=0.0, seed=0):
    """A base and two runs of rank k whose left subspaces meet at `angle` (every principal angle) and whose right
    subspaces are the same; singular values 8..1 so that the top k are the planted ones."""
    u = orthonormal(m, 2 * k, seed)
    ua, w = u[:, :k], u[:, k:]
    ub = np.cos(angle) * ua + np.sin(angle) * w  # orthonormal: w ⟂ ua
    v = orthonormal(n, k, seed + 1)
    s = np.diag(np.linspace(8, 1, k))
    base = torch.from_numpy(np.random.default_rng(seed + 2).standard_normal((m, n)) * 0.05)
    runs = [(base + torch.from_numpy(1e-2 * x @ s @ v.T)).float() for x in (ua, ub)]
    return base.float(), runs


@pytest.mark.parametrize("angle,want", [(0.0, 1.0), (np.pi / 2, 0.0), (np.pi / 3, 0.25)])
def test_planted_subspaces_meet_at_their_angle(angle, want):
    base, runs = planted(angle=angle)
    record = compute_tensor(base, runs, Criterion(), want_rank=True, want_subspaces=True)
    rows = rows_of(record)
    left8, right8 = rows[(0, 1, "left", "k8")], rows[(0, 1, "right", "k8")]
    assert left8.overlap == pytest.approx(want, abs=1e-5)  # cos² of the planted angle
    assert right8.overlap == pytest.approx(1.0, abs=1e-5)
    assert left8.chance == pytest.approx(8 / 96) and right8.chance == pytest.approx(8 / 64)
    assert (0, 1, "left", "k32") not in rows  # beyond the rank (8): no subspace to compare
    deltas = [(r.double() - base.double()).numpy() for r in runs]
    for (a, b, side, rule), row in rows.items():
        if b != BASE:
            assert row.overlap == pytest.approx(numpy_overlap(deltas[a], deltas[b], side, row.k), abs=1e-5)
        else:
            assert row.overlap == pytest.approx(numpy_overlap(deltas[a], base.double().numpy(), side, row.k), abs=1e-5)
    assert record.runs[0].rank == 8  # the rank is the rank's own, unchanged
    plain = compute_tensor(base, runs, Criterion(), want_rank=True, want_subspaces=False)
    assert [s.rank for s in plain.runs] == [s.rank for s in record.runs] and not plain.subspaces
    assert [s.energy_rank_90 for s in plain.runs] == [s.energy_rank_90 for s in record.runs]


def test_a_stack_of_experts_pools_its_experts_k_weighted():
    pairs = [planted(angle=a, seed=s) for a, s in ((0.0, 0), (np.pi / 3, 5))]
    base = torch.stack([p[0] for p in pairs])
    runs = [torch.stack([p[1][j] for p in pairs]) for j in range(2)]
    rows = rows_of(compute_tensor(base, runs, Criterion(), want_rank=True, want_subspaces=True))
    left = rows[(0, 1, "left", "k8")]
    assert left.k == 16 and left.overlap == pytest.approx((8 * 1.0 + 8 * 0.25) / 16, abs=1e-5)
    one = TensorResult.from_dict(compute_tensor(base, runs, Criterion(), want_subspaces=True).to_dict() | {})
    assert rows_of(one) == rows  # the cache's record keeps them


def test_bundled_seeds_against_numpy(tmp_path, capsys):
    root = sample_dir()
    runs = [root / f"grpo-lowlr-seed{i}" / "checkpoint-800" for i in (1, 2)]
    a = Analysis(str(root / "base"), [str(r) for r in runs], AnalysisOptions(use_cache=False, sweep=()))
    result = a.run_all()
    a.close()
    base = load_file(str(root / "base" / "model.safetensors"))
    states = [load_file(str(r / "model.safetensors")) for r in runs]
    checked = 0
    for name, record in result.tensors.items():
        if len(record.shape) != 2:
            continue
        deltas = [(s[name].double() - base[name].double()).numpy() for s in states]
        w0 = base[name].double().numpy()
        for (x, y, side, rule), row in rows_of(record).items():
            other = w0 if y == BASE else deltas[y]
            assert row.overlap == pytest.approx(numpy_overlap(deltas[x], other, side, row.k), abs=TOLERANCE), (name, rule)
            assert row.chance == pytest.approx(row.k / record.shape[0 if side == "left" else 1])
            checked += 1
    assert checked > 50
    _SVD.clear()
    out = tmp_path / "out"
    assert main(["analyze", str(root / "base"), *map(str, runs), "--out", str(out), "--quiet", "--no-cache"]) == 0
    table = list(csv.DictReader(open(out / "subspaces.csv", newline="")))
    assert table and all(float(r["lift"]) == pytest.approx(float(r["overlap"]) / float(r["chance"])) for r in table)
    assert {r["run_b"] for r in table} == {"grpo-lowlr-seed2", "base"}
    summary = json.loads((out / "summary.json").read_text())
    pooled = summary["directions"]["e90"]["left"]["pairs"]
    e90 = [r for r in table if r["k_rule"] == "e90" and r["side"] == "left" and r["run_b"] != "base"]
    k = np.array([float(r["k"]) for r in e90])
    assert pooled["overlap"] == pytest.approx(float(np.sum(k * [float(r["overlap"]) for r in e90]) / k.sum()))
    assert main(["analyze", str(root / "base"), *map(str, runs), "--out", str(tmp_path / "o2"), "--quiet",
                 "--no-cache", "--no-subspaces"]) == 0
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["directions"] is None
    assert len((tmp_path / "o2" / "subspaces.csv").read_text().splitlines()) == 1  # the header alone
