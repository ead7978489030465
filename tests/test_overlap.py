"""Properties of the overlap maths (hypothesis), and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsub_tui.records import overlap


@given(st.integers(1, 10_000), st.data())
def test_one_sided_and_jaccard_properties(n, data):
    ua = data.draw(st.integers(1, n))
    ub = data.draw(st.integers(1, n))
    both = data.draw(st.integers(max(0, ua + ub - n), min(ua, ub)))
    o1, o2 = overlap.one_sided(both, ua, ub)
    assert o1 * ua == pytest.approx(o2 * ub)
    j = overlap.jaccard(both, ua, ub)
    assert j <= min(o1, o2) + 1e-12
    assert 0 <= j <= 1
    r1, r2 = overlap.one_sided_chance(ua, ub, n)
    assert (r1, r2) == (ub / n, ua / n)


def test_hand_computed_case():
    # n = 10, A = {0..4}, B = {3..7}: both = 2
    assert overlap.one_sided(2, 5, 5) == (0.4, 0.4)
    assert overlap.jaccard(2, 5, 5) == 2 / 8
    assert overlap.jaccard_chance(5, 5, 10) == pytest.approx(0.25 / 0.75)
    assert math.isnan(overlap.ratio(1, 0))


@settings(max_examples=20, deadline=None)
@given(st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_chance_levels_match_simulation(p, q):
    rng = np.random.default_rng(0)
    n = 200_000
    a = rng.random(n) < p
    b = rng.random(n) < q
    ua, ub, both = int(a.sum()), int(b.sum()), int((a & b).sum())
    o1, _ = overlap.one_sided(both, ua, ub)
    assert o1 == pytest.approx(overlap.one_sided_chance(ua, ub, n)[0], abs=0.01)
    assert overlap.jaccard(both, ua, ub) == pytest.approx(overlap.jaccard_chance(ua, ub, n), abs=0.01)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_agreement_chance_is_poisson_binomial(densities):
    probs = overlap.agreement_chance(densities)
    assert probs.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    n = 100_000
    counts = sum((rng.random(n) < p).astype(int) for p in densities)
    simulated = np.bincount(counts, minlength=len(densities) + 1) / n
    assert np.allclose(simulated, probs, atol=0.01)
