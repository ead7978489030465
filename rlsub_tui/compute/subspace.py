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

from rlsub_tui.compute.rank import (
    certified_rank,
    cpu_gram,
    gram,
    gram_route_figures,
    stacked_figures,
    stacked_rank_figures,
)
from rlsub_tui.records.spectrum import RankFigures, energy_rank, rank_figures
from rlsub_tui.records.subspaces import BASE, FIXED_K, SubspaceRow, chance_of
from rlsub_tui.util import device_route


@dataclass
class Directions:
    """One matrix's top directions: left (m × k) and right (n × k) orthonormal columns (numpy arrays, or tensors
    on the device on the CUDA route), σ descending."""

    left: np.ndarray | torch.Tensor
    right: np.ndarray | torch.Tensor
    sigma: np.ndarray
    energy_90: int  # fewest σ holding 90% of Σσ²: the k of the "e90" comparisons

    @property
    def k(self) -> int:
        return self.left.shape[1]


def _eigh(g: torch.Tensor | np.ndarray) -> tuple:
    """Eigenvalues (ascending, as LAPACK gives them) and eigenvectors of a symmetric float64 matrix, where it
    lies: numpy's on the CPU, torch's on the device."""
    if isinstance(g, np.ndarray):
        return np.linalg.eigh(g)
    return torch.linalg.eigh(g)


def directions(delta: torch.Tensor, keep: int, energy_90: int | None = None, eig: tuple | None = None
               ) -> Directions:
    """The top `keep` directions of a 2-D matrix (fewer where σ is zero), from its float64 Gram's eigenvalues
    and vectors `eig` (ascending; taken here when not given); `energy_90` is the matrix's e90 when known (else
    from the Gram's eigenvalues). On the CUDA route the directions stay on the device, with every product there."""
    m, n = delta.shape
    if eig is None:
        eig = _eigh(gram(delta) if device_route.cuda_route(delta.device.type) else cpu_gram(delta))
    w, vecs = eig
    sq = np.clip((w.cpu().numpy() if isinstance(w, torch.Tensor) else w)[::-1], 0.0, None)
    e90 = energy_rank(sq, 0.9) if energy_90 is None else energy_90
    sigma = np.sqrt(sq[:keep])
    kept = int((sigma > 0).sum())
    sigma = sigma[:kept].astype(np.float32)
    # float32 from here: the directions' products run twice as fast, and an overlap (a mean of squared cosines)
    # moves by ~1e-6 (benchmarks/bench_subspaces.py checks against numpy's float64 SVD)
    x = delta if m >= n else delta.T  # the long side's directions, X·v/σ (Δ as float32: exact for bf16/fp16/fp32)
    if isinstance(vecs, torch.Tensor):
        top = vecs.flip(1)[:, :kept].float()
        other = (x.float() @ top) / torch.from_numpy(sigma).to(top.device)
    else:
        # column-major, so that the leading k columns of either side are one contiguous block for the overlaps
        top = np.asfortranarray(vecs[:, ::-1][:, :kept], dtype=np.float32)
        other = np.asfortranarray((x.float().cpu().numpy() @ top) / sigma)
    left, right = (other, top) if m >= n else (top, other)
    return Directions(left, right, sigma, e90)


def rank_and_directions(delta: torch.Tensor, keep_for) -> tuple[RankFigures, Directions]:
    """The rank figures exactly as rank.update_rank_figures gives them, and the top directions from the same
    decomposition: `keep_for(e90)` of them, no more than the rank (directions beyond it are not determined by Δ).

    One eigendecomposition serves both: the Gram's eigenvalues, taken with its eigenvectors, are the rank's
    (on the CPU certified by the same bound, which holds for any backward stable symmetric eigensolver)."""
    cuda = device_route.cuda_route(delta.device.type)
    g = gram(delta) if cuda else cpu_gram(delta)
    eig = _eigh(g)
    if cuda:
        figures = gram_route_figures(delta, eig[0])
    else:
        rank, sq, _ = certified_rank(delta, g, eig[0])
        figures = rank_figures(rank, sq)
    keep = min(keep_for(figures.energy_rank_90), figures.rank)
    return figures, directions(delta, keep, energy_90=figures.energy_rank_90, eig=eig)


def figures_and_directions(delta: torch.Tensor, known: RankFigures | None,
                           want_directions: bool) -> tuple[RankFigures, Directions | list[Directions] | None]:
    """A 2-D update's (or a stack of expert updates') rank figures, `known` ones reused, and with
    `want_directions` its top directions (a stack: one Directions per expert, figures summed over them)."""
    side = min(delta.shape[-2:])
    if not want_directions:
        return (known if known is not None else stacked_rank_figures(delta)), None
    if known is not None and delta.ndim == 2:  # a known rank: only its directions
        keep = min(needed_k(known.energy_rank_90, side), known.rank)
        return known, directions(delta, keep, energy_90=known.energy_rank_90)
    keep = lambda e90: needed_k(e90, side)  # noqa: E731
    if delta.ndim == 2:
        return rank_and_directions(delta, keep)
    pairs = [rank_and_directions(d, keep) for d in delta]
    return stacked_figures([f for f, _ in pairs]), [d for _, d in pairs]


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """‖A_kᵀ B_k‖_F² / k: the mean squared cosine of the principal angles between two k-dimensional
    subspaces (1: the same subspace; k/dim for independent uniformly random ones)."""
    return overlaps(a, b, [k])[0]


def overlaps(a: np.ndarray, b: np.ndarray, ks: list[int]) -> list[float]:
    """`overlap` at each k of `ks`, from one product: the leading k × k block of A_Kᵀ B_K (K the largest k)
    is A_kᵀ B_k."""
    top = max(ks)
    cross = a[:, :top].T @ b[:, :top]
    if isinstance(cross, torch.Tensor):  # on the device: every sum there, one copy back
        squared = cross.double() ** 2
        return [float(x) / k for x, k in zip(torch.stack([squared[:k, :k].sum() for k in ks]).cpu().tolist(), ks)]
    squared = cross.astype(np.float64) ** 2
    return [float(squared[:k, :k].sum() / k) for k in ks]


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
        ks = [(rule, k) for rule, k in ks if 1 <= k <= min(da.k, db.k)]
        if not ks:
            continue
        for side, dim, x, y in (("left", m, da.left, db.left), ("right", n, da.right, db.right)):
            found_k = overlaps(x, y, [k for _, k in ks])
            rows += [SubspaceRow(a, b, side, rule, k, o, chance_of(k, dim)) for (rule, k), o in zip(ks, found_k)]
    return rows


def needed_k(energy_90: int, side: int) -> int:
    """How many directions to keep of one matrix: enough for its e90 and for every fixed k it can have."""
    return min(side, max([energy_90] + [k for k in FIXED_K if k <= side]))
