"""The mask map and the log2 |Δ| histogram of one tensor, against numpy on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import mask, stored_delta
from synthetic import base_state, save, sparse_run

from rlsub_tui.compute.matrix_detail import LOG2_MIN, detail, read_tensor
from rlsub_tui.records.criteria import AnalysisOptions, Criterion

NAME = "model.layers.0.mlp.gate_proj.weight"  # 48 x 32


def _numpy_blocks(m: np.ndarray, rows: int, cols: int) -> np.ndarray:
    r_cell = np.arange(m.shape[0]) * rows // m.shape[0]
    c_cell = np.arange(m.shape[1]) * cols // m.shape[1]
    out = np.zeros((rows, cols))
    np.add.at(out, (r_cell[:, None], c_cell[None, :]), m)
    return out


@pytest.mark.parametrize("rows,cols", [(5, 7), (48, 32), (100, 3)])
def test_mask_map_and_histogram_match_numpy(tmp_path, rows, cols):
    b = base_state()
    save(b, tmp_path / "base")
    runs = [sparse_run(b, s) for s in range(3)]
    for s, r in enumerate(runs):
        save(r, tmp_path / f"r{s}")
    opts = AnalysisOptions()
    tensors = read_tensor(str(tmp_path / "base"), [str(tmp_path / f"r{s}") for s in range(3)], opts, NAME)
    d = detail(NAME, tensors, opts, (0, 2), rows, cols)
    base = b[NAME].float().numpy()
    masks = [mask(base, runs[i][NAME].float().numpy(), "bf16") for i in (0, 2)]
    r, c = min(rows, 48), min(cols, 32)
    assert d.cell_numel.sum() == 48 * 32 and d.cell_numel.shape == (r, c)
    for j, m in enumerate(masks):
        assert np.array_equal(d.updated[j], _numpy_blocks(m, r, c))
        np.testing.assert_allclose(d.fraction(j), _numpy_blocks(m, r, c) / _numpy_blocks(np.ones_like(m), r, c))
        delta = np.abs(stored_delta(base, runs[(0, 2)[j]][NAME].float().numpy(), "bf16"))
        nz = delta[delta > 0]
        want = np.bincount((np.floor(np.log2(nz)).astype(int) - LOG2_MIN), minlength=len(d.log2_bins))
        assert d.log2_counts[j].tolist() == want.tolist()
        assert d.zero[j] == int((delta == 0).sum())
    assert np.array_equal(d.consensus, _numpy_blocks(masks[0] & masks[1], r, c))
    assert d.tolerance_log2 == pytest.approx(np.log2(1.00136e-5), abs=1e-4)


def test_relative_criterion_and_one_dimensional(tmp_path):
    base = torch.tensor([1.0, 2.0, 4.0, 0.0])
    run = torch.tensor([1.0005, 2.01, 4.0, 1e-9])
    opts = AnalysisOptions(criterion=Criterion("relative", 1e-3))
    d = detail("v", [base, run], opts, (0,), 4, 4)
    assert d.updated[0].tolist() == [[0, 1, 0, 1]]  # 5e-4 relative is under 1e-3; 0 -> 1e-9 is a full change
    assert d.tolerance_log2 is None


def test_unknown_tensor_is_one_sentence(tmp_path):
    from rlsub_tui.util.errors import InputError

    b = base_state()
    save(b, tmp_path / "base")
    save(sparse_run(b, 0), tmp_path / "r0")
    with pytest.raises(InputError, match="nope: not compared"):
        read_tensor(str(tmp_path / "base"), [str(tmp_path / "r0")], AnalysisOptions(), "nope")


def test_resampled_merges_counts():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.standard_normal((50, 70)).astype(np.float32))
    run = base.clone()
    run[rng.random((50, 70)) < 0.3] += 1.0
    opts = AnalysisOptions(criterion=Criterion("exact", 0.0))
    fine = detail("m", [base, run], opts, (0,))
    coarse = fine.resampled(6, 9)
    m = (run != base).numpy()
    assert np.array_equal(coarse.updated[0], _numpy_blocks(m, 6, 9))
    assert np.array_equal(coarse.cell_numel, _numpy_blocks(np.ones_like(m), 6, 9))
