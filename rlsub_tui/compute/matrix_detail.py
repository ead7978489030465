"""Looking inside one tensor on demand: its mask map (updated fraction per block of the matrix) and the
distribution of log2 |Δ| per run. Reads that one tensor from each checkpoint, never the whole model."""

from __future__ import annotations

import math

import numpy as np
import torch

from rlsub_tui.compute.kernels import criterion_mask, rounded, stored_delta
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.records.results import MatrixDetail  # no torch there: an analysis process sends it to the UI

ROW_CHUNK_ELEMENTS = 1 << 24  # rows are processed in blocks of about this many parameters
LOG2_MIN, LOG2_MAX = -40, 8
FINE_CELLS = (96, 256)  # the map is counted on at most this grid once, then merged to the screen's size  # histogram range of log2 |Δ| (clamped at the ends)


def _cells(length: int, cells: int) -> torch.Tensor:
    return (torch.arange(length, dtype=torch.int64) * cells) // max(length, 1)


def detail(name: str, tensors: list[torch.Tensor], options: AnalysisOptions, runs: tuple[int, ...],
           rows: int = FINE_CELLS[0], cols: int = FINE_CELLS[1]) -> MatrixDetail:
    """tensors: base then every run (one shape; each run in its pair's comparison dtype, the base cast to it
    here, as the analysis does); a 1-D tensor is mapped as one row."""
    base, others = tensors[0], [tensors[1 + i] for i in runs]
    shape = tuple(base.shape)
    mat = base.reshape(1, -1) if base.ndim < 2 else base.reshape(base.shape[0], -1)
    m, n = mat.shape
    rows, cols = max(1, min(rows, m)), max(1, min(cols, n))
    col_cell, row_cell = _cells(n, cols), _cells(m, rows)
    crit = options.criterion
    works = [torch.float64 if r.dtype == torch.float64 else torch.float32 for r in others]
    tols = [rounded(crit.value, r.dtype) if crit.name == "atol" else 0.0 for r in others]
    nbins = LOG2_MAX - LOG2_MIN + 1
    updated = torch.zeros(len(others), rows, cols, dtype=torch.float64)
    consensus = torch.zeros(rows, cols, dtype=torch.float64)
    hist = np.zeros((len(others), nbins), dtype=np.int64)
    zero = np.zeros(len(others), dtype=np.int64)
    step = max(1, ROW_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, m, step):
        b = mat[start:start + step]
        every = torch.ones(b.shape, dtype=torch.bool)
        for j, run in enumerate(others):
            r = run.reshape(m, n)[start:start + step]
            bj, work = (b if b.dtype == r.dtype else b.to(r.dtype)), works[j]
            d = stored_delta(bj, r).to(work)
            finite = torch.isfinite(d)
            absd = torch.where(finite, d.abs(), torch.zeros_like(d))
            mask = criterion_mask(bj, r, absd, crit, tols[j], work) | ~finite
            every &= mask
            updated[j] += _block_sum(mask, row_cell[start:start + step], col_cell, rows, cols)
            nonzero = absd[finite & (absd > 0)]
            zero[j] += int((finite & (absd == 0)).sum())
            if nonzero.numel():
                exps = torch.floor(torch.log2(nonzero.double())).clamp(LOG2_MIN, LOG2_MAX).to(torch.int64)
                hist[j] += torch.bincount(exps - LOG2_MIN, minlength=nbins).numpy()
        consensus += _block_sum(every, row_cell[start:start + step], col_cell, rows, cols)
    cell_numel = np.outer(np.bincount(row_cell.numpy(), minlength=rows), np.bincount(col_cell.numpy(), minlength=cols))
    return MatrixDetail(name, shape, tuple(runs), cell_numel, updated.numpy().astype(np.int64),
                        consensus.numpy().astype(np.int64), np.arange(LOG2_MIN, LOG2_MAX + 1), hist, zero,
                        math.log2(max(tols)) if crit.name == "atol" and tols and max(tols) > 0 else None)


def _block_sum(mask: torch.Tensor, row_cell: torch.Tensor, col_cell: torch.Tensor, rows: int, cols: int):
    by_col = torch.zeros(mask.shape[0], cols, dtype=torch.float64).index_add_(1, col_cell, mask.double())
    return torch.zeros(rows, cols, dtype=torch.float64).index_add_(0, row_cell, by_col)


def read_tensor(base: str, runs: list[str], options: AnalysisOptions, name: str) -> list[torch.Tensor]:
    """The base's tensor `name` and each run's match (same rules as the analysis), on the CPU, each run in
    its pair's comparison dtype."""
    from rlsub_tui.compute.engine import Analysis
    from rlsub_tui.util.errors import InputError

    analysis = Analysis(base, runs, options)
    try:
        tensors = analysis.read_tensors(name)
    finally:
        analysis.close()
    if tensors is None:
        raise InputError(f"{name}: not compared in this analysis (press w for the reason).")
    return tensors
