"""Overlap between runs' update sets, from counts alone: one-sided overlap, Jaccard, chance levels."""

from __future__ import annotations

import math

import numpy as np


def ratio(num: float, den: float) -> float:
    """num / den, NaN when the denominator is zero (an undefined fraction, shown empty)."""
    return num / den if den else math.nan


def one_sided(both: int, updated_a: int, updated_b: int) -> tuple[float, float]:
    """(o1, o2) = (|A∩B|/|A|, |A∩B|/|B|), as in Mukherjee et al. Table 4."""
    return ratio(both, updated_a), ratio(both, updated_b)


def one_sided_chance(updated_a: int, updated_b: int, numel: int) -> tuple[float, float]:
    """Chance levels of (o1, o2) if the other set were uniformly random of its size: (|B|/n, |A|/n)."""
    return ratio(updated_b, numel), ratio(updated_a, numel)


def jaccard(both: int, updated_a: int, updated_b: int) -> float:
    return ratio(both, updated_a + updated_b - both)


def jaccard_chance(updated_a: int, updated_b: int, numel: int) -> float:
    """Expected Jaccard of two independent random sets with densities p, q: pq / (p + q - pq)."""
    p, q = ratio(updated_a, numel), ratio(updated_b, numel)
    if math.isnan(p) or math.isnan(q):
        return math.nan
    return ratio(p * q, p + q - p * q)


def agreement_chance(densities: list[float]) -> np.ndarray:
    """P(a parameter is updated by exactly j of K independent runs), j = 0..K: a Poisson-binomial."""
    probs = np.zeros(len(densities) + 1)
    probs[0] = 1.0
    for p in densities:
        p = 0.0 if math.isnan(p) else p
        probs[1:] = probs[1:] * (1 - p) + probs[:-1] * p
        probs[0] *= 1 - p
    return probs


def sign_agreement_chance(agreement) -> float:
    """Expected share of same-sign updates among parameters updated by two or more runs, if each run's
    sign were a fair coin: a parameter updated by exactly j runs has all signs equal with chance 2^(1-j)."""
    several = [(j, int(n)) for j, n in enumerate(agreement) if j >= 2]
    return ratio(sum(n * 2.0 ** (1 - j) for j, n in several), sum(n for _, n in several))
