"""What an update's singular values say beyond its default rank: stable, energy and effective rank (numpy, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ENERGY_FRACTIONS = (0.9, 0.99)
CURVE_POINTS = 100  # the cumulative-energy curve is kept at k / min(m, n) = 0, 1/100, ..., 1


@dataclass(frozen=True)
class RankFigures:
    """The default rank of one run's update matrix and the figures of its spectrum (science.md)."""

    rank: int
    stable_rank: float
    energy_rank_90: int
    energy_rank_99: int
    effective_rank: float
    energy_curve: tuple[float, ...] = ()  # share of Σσ² in the top ⌈x·min(m,n)⌉ σ, x = 0, 0.01, ..., 1


def stable_rank(sq: np.ndarray) -> float:
    """‖Δ‖_F² / σ_1² from the squared singular values; 0 for a zero update."""
    top = float(sq.max()) if sq.size else 0.0
    return float(sq.sum() / top) if top > 0 else 0.0


def energy_rank(sq: np.ndarray, fraction: float) -> int:
    """The smallest k with Σ_{i≤k} σ_i² ≥ fraction · Σ σ_i² (σ sorted descending); 0 for a zero update."""
    ordered = np.sort(sq)[::-1]
    total = float(ordered.sum())
    if total <= 0:
        return 0
    cumulative = np.cumsum(ordered)
    return min(int(np.searchsorted(cumulative, fraction * total, side="left")) + 1, ordered.size)


def effective_rank(sq: np.ndarray) -> float:
    """Roy & Vetterli's exp(−Σ p_i ln p_i), p_i = σ_i / Σ σ_j; 0 for a zero update."""
    sigma = np.sqrt(sq)
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def energy_curve(sq: np.ndarray, side: int) -> tuple[float, ...]:
    """Cumulative energy share of the largest ⌈x·side⌉ squared singular values at x = j / CURVE_POINTS.

    `sq` holds the values that count (at most side of them); a zero update gives an empty curve.
    """
    ordered = np.sort(sq)[::-1]
    total = float(ordered.sum())
    if total <= 0 or side <= 0:
        return ()
    cumulative = np.concatenate([[0.0], np.cumsum(ordered) / total])
    k = np.minimum(np.ceil(np.arange(CURVE_POINTS + 1) * side / CURVE_POINTS - 1e-9).astype(int), ordered.size)
    return tuple(round(float(x), 6) for x in np.minimum(cumulative[k], 1.0))  # 6 digits: a chart, not a figure


def rank_figures(rank: int, squared_singular_values) -> RankFigures:
    """RankFigures from a rank and the σ_i² of the same matrix (float64).

    Only the `rank` largest values enter the figures: the rest lie below the rank's own float32
    tolerance, i.e. they are zero to the precision of the data, and their rounding noise differs
    between the SVD and the Gram route (so leaving them out keeps CPU and GPU figures equal).
    """
    every = np.asarray(squared_singular_values, dtype=np.float64).reshape(-1)
    sq = np.clip(np.sort(every)[::-1][:max(int(rank), 0)], 0.0, None)
    return RankFigures(rank=int(rank), stable_rank=stable_rank(sq),
                       energy_rank_90=energy_rank(sq, ENERGY_FRACTIONS[0]),
                       energy_rank_99=energy_rank(sq, ENERGY_FRACTIONS[1]),
                       effective_rank=effective_rank(sq), energy_curve=energy_curve(sq, every.size))
