"""Whether runs move the same directions: the top singular subspaces of each run's update, from the decomposition
the rank already takes, and their overlaps across runs and with the base weight's own (records/subspaces.py).

For Δ (m × n) the rank's Gram is the smaller side's, XᵀX with X = Δ when tall (its eigenvectors are Δ's right
singular vectors V, and U = ΔV/σ) or X = Δᵀ when wide (eigenvectors U, V = ΔᵀU/σ). Only directions whose σ
is counted by the rank are kept: beyond it the subspace is not determined by Δ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlsub_tui.compute.rank import certified_rank, cpu_gram, gram
from rlsub_tui.records.spectrum import RankFigures, energy_rank, rank_figures
from rlsub_tui.records.subspaces import BASE, FIXED_K, SubspaceRow, chance_of
from rlsub_tui.util import device_route


@dataclass
class Directions:
    """One matrix's top directions: left (m × k) and right (n × k) orthonormal columns, σ descending."""

    left: np.ndarray
    right: np.ndarray
    sigma: np.ndarray
    energy_90: int  # fewest σ holding 90% of Σσ²: the k of the "e90" comparisons

    @property
    def k(self) -> int:
        return self.left.shape[1]


def _eigh(g: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of a symmetric float64 matrix."""
    if isinstance(g, np.ndarray):
        w, v = np.linalg.eigh(g)
    else:
        w, v = torch.linalg.eigh(g)
        w, v = w.cpu().numpy(), v.cpu().numpy()
    return w[::-1], v[:, ::-1]


def directions(delta: torch.Tensor, keep: int, g=None, energy_90: int | None = None) -> Directions:
    """The top `keep` directions of a 2-D matrix (fewer where σ is zero), from its float64 Gram `g` (computed
    here when not given); `energy_90` is the matrix's e90 when known (else from the Gram's eigenvalues)."""
    m, n = delta.shape
    if g is None:
        g = cpu_gram(delta) if not device_route.cuda_route(delta.device.type) else gram(delta)
    w, vecs = _eigh(g)
    sq = np.clip(w, 0.0, None)
    e90 = energy_rank(sq, 0.9) if energy_90 is None else energy_90
    sigma = np.sqrt(sq[:keep])
    kept = int((sigma > 0).sum())
    # float32 from here: the directions' products run twice as fast, and an overlap (a mean of squared cosines)
    # moves by ~1e-6 (benchmarks/bench_subspaces.py checks against numpy's float64 SVD)
    sigma, vecs = sigma[:kept], np.ascontiguousarray(vecs[:, :kept], dtype=np.float32)
    x = delta if m >= n else delta.T  # the long side's directions, X·v/σ (Δ as float32: exact for bf16/fp16/fp32)
    other = ((x.float().cpu().numpy() @ vecs) / sigma.astype(np.float32)) if kept else np.zeros((max(m, n), 0),
                                                                                                  dtype=np.float32)
    left, right = (other, vecs) if m >= n else (vecs, other)
    return Directions(left, right, sigma, e90)


def rank_and_directions(delta: torch.Tensor, keep_for) -> tuple[RankFigures, Directions]:
    """The rank figures exactly as rank.update_rank_figures gives them, and the top directions from the same
    Gram: `keep_for(e90)` of them, no more than the rank (directions beyond it are not determined by Δ)."""
    if device_route.cuda_route(delta.device.type):
        from rlsub_tui.compute.rank import update_rank_figures

        figures = update_rank_figures(delta)
        g = None
    else:
        g = cpu_gram(delta)
        rank, sq, _ = certified_rank(delta, g)
        figures = rank_figures(rank, sq)
    keep = min(keep_for(figures.energy_rank_90), figures.rank)
    return figures, directions(delta, keep, g, figures.energy_rank_90)


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """‖A_kᵀ B_k‖_F² / k: the mean squared cosine of the principal angles between two k-dimensional
    subspaces (1: the same subspace; k/dim for independent uniformly random ones)."""
    cross = (a[:, :k].T @ b[:, :k]).astype(np.float64)
    return float(np.sum(cross * cross) / k)


def pair_rows(found: list[Directions | None], base: Directions | None, shape: tuple[int, int]) -> list[SubspaceRow]:
    """Every pair of runs and every run against the base, left and right, at k = the smaller e90 of the two and
    at each fixed k both have (rows for one matrix; `found[j]` None where run j has no directions)."""
    m, n = shape
    rows = []
    others = [(a, b, found[a], found[b]) for a in range(len(found)) for b in range(a + 1, len(found))]
    others += [(a, BASE, found[a], base) for a in range(len(found))]
    for a, b, da, db in others:
        if da is None or db is None:
            continue
        ks = [("e90", min(da.energy_90, db.energy_90))] + [(f"k{k}", k) for k in FIXED_K]
        for rule, k in ks:
            if k < 1 or k > min(da.k, db.k):
                continue
            for side, dim, x, y in (("left", m, da.left, db.left), ("right", n, da.right, db.right)):
                rows.append(SubspaceRow(a, b, side, rule, k, overlap(x, y, k), chance_of(k, dim)))
    return rows


def needed_k(energy_90: int, side: int) -> int:
    """How many directions to keep of one matrix: enough for its e90 and for every fixed k it can have."""
    return min(side, max([energy_90] + [k for k in FIXED_K if k <= side]))
