"""Overlap between runs' update sets, from counts alone: one-sided overlap, Jaccard, chance levels."""

from __future__ import annotations

import math

import numpy as np


def ratio(num: float, den: float) -> float:
    """num / den, NaN when the denominator is zero (an undefined fraction, shown empty)."""
    return num / den if den else math.nan


def lift(observed: float, chance: float) -> float:
    """Observed over its chance level; NaN when either is undefined or the chance is zero."""
    return ratio(observed, chance)


def nan_mean(values) -> float:
    """Mean of the values that are defined (not NaN); NaN when none is."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


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


# --- the stratified null (science.md, "A fair chance level") -----------------------------------------
# A stratum is one tensor x one |w0| magnitude bin. Within a stratum a random run updates uniformly at
# the stratum's own density, so pooled figures sum expected counts over strata (never average ratios).


def expected_intersections(updated: np.ndarray, numel: np.ndarray) -> np.ndarray:
    """E[a, b] = Σ_s a_s · b_s / n_s for every pair of runs; updated is (K, S) counts, numel (S,) stratum sizes."""
    updated = np.asarray(updated, dtype=np.float64)
    numel = np.asarray(numel, dtype=np.float64)
    used = numel > 0
    counts = updated[:, used]
    return counts @ (counts / numel[used]).T


def one_sided_chance_strat(expected_both: float, updated_a: int, updated_b: int) -> tuple[float, float]:
    """(o1, o2) chance levels under the stratified null: (E / |A|, E / |B|)."""
    return ratio(expected_both, updated_a), ratio(expected_both, updated_b)


def jaccard_chance_strat(expected_both: float, updated_a: int, updated_b: int) -> float:
    """Jaccard chance level under the stratified null: E / (|A| + |B| − E)."""
    return ratio(expected_both, updated_a + updated_b - expected_both)


def agreement_chance_strat(updated: np.ndarray, numel: np.ndarray) -> np.ndarray:
    """Expected count of parameters updated by exactly j of K runs (j = 0..K): a Poisson-binomial in each
    stratum with that stratum's densities, weighted by n_s and summed over strata."""
    updated = np.asarray(updated, dtype=np.float64)
    numel = np.asarray(numel, dtype=np.float64)
    used = numel > 0
    densities = updated[:, used] / numel[used]  # (K, S)
    probs = np.zeros((int(used.sum()), updated.shape[0] + 1))
    probs[:, 0] = 1.0
    for p in densities:
        probs[:, 1:] = probs[:, 1:] * (1 - p)[:, None] + probs[:, :-1] * p[:, None]
        probs[:, 0] *= 1 - p
    return numel[used] @ probs


def sign_agreement_chance(agreement) -> float:
    """Expected share of same-sign updates among parameters updated by two or more runs, if each run's
    sign were a fair coin: a parameter updated by exactly j runs has all signs equal with chance 2^(1-j)."""
    several = [(j, int(n)) for j, n in enumerate(agreement) if j >= 2]
    return ratio(sum(n * 2.0 ** (1 - j) for j, n in several), sum(n for _, n in several))


# --- rows and columns (structure.py counts them) ------------------------------------------------------


def touched_chance(updated: int, numel: int, length: int) -> float:
    """Chance that a line of `length` parameters holds an update if the `updated` ones were spread uniformly:
    1 − (1 − density)^length; NaN for an empty matrix."""
    if not numel:
        return math.nan
    density = updated / numel
    if density >= 1:
        return 1.0
    return -math.expm1(length * math.log1p(-density))
