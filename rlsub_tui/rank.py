"""Rank of an update matrix, equal to torch.linalg.matrix_rank(delta.float()) but faster on long matrices,
and the figures of its spectrum from the same decomposition (spectrum.py).

Route: eigenvalues of the Gram matrix of the smaller side, formed in float64, thresholded at
PyTorch's float32 default tolerance squared (sigma > sigma_max * max(m, n) * eps32).
Float64 keeps the Gram's rounding error (~1e-16 * sigma_max^2) far below that threshold
(~1e-13 * sigma_max^2 and up), so the count matches a float32 SVD's.
"""

from __future__ import annotations

import numpy as np
import torch

from rlsub_tui.spectrum import RankFigures, rank_figures

EPS32 = torch.finfo(torch.float32).eps
CHUNK_ELEMENTS = 1 << 24  # float64 working set per step: 128 MB
SQUARISH = 2  # below this aspect ratio the reference SVD is as fast as the Gram route on the CPU (measured)


def gram(delta: torch.Tensor) -> torch.Tensor:
    """delta @ delta.T or delta.T @ delta, whichever is smaller, in float64, built in chunks."""
    m, n = delta.shape
    side = min(m, n)
    out = torch.zeros((side, side), dtype=torch.float64, device=delta.device)
    if m >= n:
        step = max(1, CHUNK_ELEMENTS // max(n, 1))
        for start in range(0, m, step):
            block = delta[start:start + step].to(torch.float32).to(torch.float64)
            out.addmm_(block.T, block)
    else:
        step = max(1, CHUNK_ELEMENTS // max(m, 1))
        for start in range(0, n, step):
            block = delta[:, start:start + step].to(torch.float32).to(torch.float64)
            out.addmm_(block, block.T)
    return out


def update_rank(delta: torch.Tensor) -> int:
    """Numerical rank of a 2-D update with PyTorch's default float32 tolerance."""
    return update_rank_figures(delta).rank


def _svd_route(delta: torch.Tensor) -> tuple[int, torch.Tensor]:
    """matrix_rank's own computation (float32 svdvals, tolerance rtol * σ_max formed in float32), plus σ_i²."""
    sigma = torch.linalg.svdvals(delta.float())
    rtol = torch.tensor(EPS32 * max(delta.shape), dtype=torch.float32)
    rank = int((sigma > rtol * sigma.max()).sum())
    wide = sigma.to(torch.float64)
    return rank, wide * wide


def _gram_route(delta: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Eigenvalues of the float64 Gram matrix (σ_i²), thresholded at the float32 rule squared."""
    sq = torch.linalg.eigvalsh(gram(delta)).cpu()
    top = float(sq[-1])
    if top <= 0.0:
        return 0, sq
    return int((sq > top * (max(delta.shape) * EPS32) ** 2).sum()), sq


def update_rank_figures(delta: torch.Tensor) -> RankFigures:
    """Default rank of a 2-D update (PyTorch's float32 tolerance) and its spectrum's figures, from one decomposition.

    Near-square on the CPU the Gram route saves nothing over the SVD, so the float32 SVD that
    matrix_rank itself runs is used (svdvals: the same decomposition, hence the same rank). On CUDA
    the Gram route is faster for every shape (H200: 75 vs 115 ms at 1536^2, 78 vs 420 ms at 3584^2
    against gesvd; BENCHMARKS.md), and gesvdj is inaccurate on large matrices.
    """
    if delta.ndim != 2:
        raise ValueError("update_rank needs a 2-D matrix")
    m, n = delta.shape
    if m == 0 or n == 0:
        return rank_figures(0, [])
    near_square = max(m, n) < SQUARISH * min(m, n) and not delta.is_cuda
    rank, sq = _svd_route(delta) if near_square else _gram_route(delta)
    return rank_figures(rank, sq.numpy())


def stacked_rank(delta: torch.Tensor) -> int:
    """Rank of a 2-D update; for a 3-D stack of expert matrices, the sum of each expert's rank."""
    if delta.ndim == 3:
        return sum(update_rank(d) for d in delta)
    return update_rank(delta)


def stacked_rank_figures(delta: torch.Tensor) -> RankFigures:
    """Rank and spectrum figures of a 2-D update; for a 3-D stack of expert matrices, each figure summed
    over the experts (so its ratio to E·min(m, n) is the experts' mean ratio) and their mean energy curve."""
    if delta.ndim != 3:
        return update_rank_figures(delta)
    figs = [update_rank_figures(d) for d in delta]
    curves = [f.energy_curve for f in figs if f.energy_curve]
    curve = tuple(float(x) for x in np.mean(curves, axis=0)) if len(curves) == len(figs) and curves else ()
    return RankFigures(sum(f.rank for f in figs), sum(f.stable_rank for f in figs),
                       sum(f.energy_rank_90 for f in figs), sum(f.energy_rank_99 for f in figs),
                       sum(f.effective_rank for f in figs), curve)


def reference_rank(delta: torch.Tensor) -> int:
    """The reference implementation's rank (Mukherjee et al.), for checks and benchmarks."""
    if delta.is_cuda:
        s = torch.linalg.svdvals(delta.float(), driver="gesvd")
        tol = s.max() * max(delta.shape) * EPS32 if s.numel() else 0.0
        return int((s > tol).sum())
    return int(torch.linalg.matrix_rank(delta.float()))
