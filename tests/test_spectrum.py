"""Spectrum figures (stable, energy, effective rank) against numpy's SVD, on both rank routes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference import numpy_rank
from rlsub_tui.rank import SQUARISH, update_rank, update_rank_figures
from rlsub_tui.spectrum import effective_rank, energy_rank, rank_figures, stable_rank


def numpy_figures(delta: torch.Tensor) -> dict:
    """The four figures straight from the definitions in science.md, on numpy's float64 SVD."""
    sigma = np.linalg.svd(delta.float().numpy().astype(np.float64), compute_uv=False)
    energy = sigma ** 2
    cumulative = np.cumsum(energy) / energy.sum()
    p = sigma / sigma.sum()
    p = p[p > 0]
    return {
        "stable_rank": energy.sum() / sigma[0] ** 2,
        "energy_rank_90": int(np.argmax(cumulative >= 0.9)) + 1,
        "energy_rank_99": int(np.argmax(cumulative >= 0.99)) + 1,
        "effective_rank": math.exp(-np.sum(p * np.log(p))),
    }


def bf16_merge(shape, update: torch.Tensor, seed: int) -> torch.Tensor:
    """Δ as stored: bf16(w0 + update) - w0 for bf16 base weights w0."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return (w0.float() + update).to(torch.bfloat16) - w0


def low_rank(shape, r: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) * (scale / math.sqrt(r))


def test_hand_computed_spectrum():
    sq = np.array([9.0, 16.0, 0.0])  # sigma = 3, 4, 0
    assert stable_rank(sq) == pytest.approx(25 / 16)
    assert energy_rank(sq, 0.6) == 1  # 16 >= 15
    assert energy_rank(sq, 0.9) == 2  # 16 < 22.5 <= 25
    assert energy_rank(sq, 0.64) == 1  # exactly 16 >= 0.64 * 25 counts
    p = np.array([4 / 7, 3 / 7])
    assert effective_rank(sq) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    flat = rank_figures(5, np.ones(5))
    assert (flat.stable_rank, flat.energy_rank_90, flat.energy_rank_99) == (5.0, 5, 5)
    assert flat.effective_rank == pytest.approx(5.0)


def test_zero_update_has_zero_figures():
    f = update_rank_figures(torch.zeros(40, 30))
    assert (f.rank, f.stable_rank, f.energy_rank_90, f.energy_rank_99, f.effective_rank) == (0, 0.0, 0, 0, 0.0)
    f = update_rank_figures(torch.zeros(400, 30))
    assert (f.rank, f.stable_rank, f.energy_rank_90, f.energy_rank_99, f.effective_rank) == (0, 0.0, 0, 0, 0.0)


@pytest.mark.parametrize("shape", [(384, 256), (256, 384), (1024, 256), (256, 1024)])
def test_rank8_update_merged_into_bf16(shape):
    """bf16 rounding makes the default rank full; the energy ranks still see the 8 directions."""
    delta = bf16_merge(shape, low_rank(shape, 8, 1e-3, seed=sum(shape)), seed=1)
    f = update_rank_figures(delta)
    assert f.rank == min(shape) == int(torch.linalg.matrix_rank(delta.float()))
    assert 7 <= f.energy_rank_99 <= 9
    assert f.energy_rank_90 <= f.energy_rank_99
    assert f.stable_rank < 8
    expected = numpy_figures(delta)
    assert f.energy_rank_90 == expected["energy_rank_90"]
    assert f.energy_rank_99 == expected["energy_rank_99"]
    assert f.stable_rank == pytest.approx(expected["stable_rank"], rel=1e-4)
    assert f.effective_rank == pytest.approx(expected["effective_rank"], rel=1e-4)


@pytest.mark.parametrize("shape", [(384, 256), (256, 384), (1024, 256), (256, 1024)])
def test_full_rank_gaussian_update_has_energy_ranks_near_full(shape):
    g = torch.Generator().manual_seed(11)
    delta = bf16_merge(shape, torch.randn(shape, generator=g) * 1e-3, seed=2)
    f = update_rank_figures(delta)
    side = min(shape)
    assert f.rank == side
    assert f.energy_rank_99 >= 0.85 * side
    assert f.energy_rank_90 >= 0.55 * side  # a Gaussian spectrum (Marchenko-Pastur) is not flat
    assert f.effective_rank >= 0.85 * side
    expected = numpy_figures(delta)
    assert (f.energy_rank_90, f.energy_rank_99) == (expected["energy_rank_90"], expected["energy_rank_99"])
    assert f.stable_rank == pytest.approx(expected["stable_rank"], rel=1e-4)
    assert f.effective_rank == pytest.approx(expected["effective_rank"], rel=1e-4)


@pytest.mark.parametrize("shape,r", [((300, 300), 40), ((257, 300), 300), ((500, 260), 17), ((64, 96), 64)])
def test_svd_route_rank_equals_matrix_rank(shape, r):
    """Near-square CPU matrices take the svdvals route: the same count as matrix_rank, always."""
    assert max(shape) < SQUARISH * min(shape)
    delta = bf16_merge(shape, low_rank(shape, r, 3e-4, seed=r), seed=3)
    assert update_rank(delta) == int(torch.linalg.matrix_rank(delta.float()))
    exact = low_rank(shape, r, 1.0, seed=r + 1)
    assert update_rank(exact) == int(torch.linalg.matrix_rank(exact)) == numpy_rank(exact.numpy())
    expected = numpy_figures(exact)
    f = update_rank_figures(exact)
    assert f.energy_rank_99 == expected["energy_rank_99"] <= r
    assert f.effective_rank == pytest.approx(expected["effective_rank"], rel=1e-4)


def test_svd_route_near_threshold_spectrum():
    """A near-square matrix with singular values on both sides of the tolerance."""
    g = torch.Generator().manual_seed(5)
    n = 200
    u, _ = torch.linalg.qr(torch.randn(n + 50, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    tol_rel = (n + 50) * torch.finfo(torch.float32).eps
    s = torch.ones(n, dtype=torch.float64)
    s[:37] = math.sqrt(2.0)  # energy 2 each: 37 * 2 + 63 * 1 = 137 in the top 100 values
    s[150:] = tol_rel * 1e-2
    s[100:150] = tol_rel * 1e2
    delta = ((u * s) @ v.T).float()
    assert update_rank(delta) == int(torch.linalg.matrix_rank(delta)) == 150
    f = update_rank_figures(delta)
    expected = numpy_figures(delta)
    # 90% of 137 = 123.3 <= 74 + 50 ones (k = 87); 99% = 135.63 <= 74 + 62 ones (k = 99)
    assert f.energy_rank_90 == expected["energy_rank_90"] == 87
    assert f.energy_rank_99 == expected["energy_rank_99"] == 99
    assert f.stable_rank == pytest.approx(68.5, rel=1e-4)
