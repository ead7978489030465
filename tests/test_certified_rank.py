"""The CPU rank's certificate: identical to numpy's float64 SVD under PyTorch's float32 rule, on spectra
planted at the threshold, on bf16-like deltas, tall, wide and square; and the error bound holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlsub_tui.compute import rank as rank_mod
from rlsub_tui.compute.rank import certified_rank, cpu_gram, error_bound, exact_route, threshold_band, update_rank

EPS32 = np.finfo(np.float32).eps


def numpy_rank64(delta: torch.Tensor) -> int:
    """The float32 rule (σ > σmax · max(m, n) · eps32) on numpy's float64 SVD of the float32 matrix."""
    d = delta.float().numpy().astype(np.float64)
    s = np.linalg.svd(d, compute_uv=False)
    return int((s > s.max() * max(d.shape) * EPS32).sum()) if s.size and s.max() > 0 else 0


def planted(shape, sigma: np.ndarray, seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ with random orthonormal U, V (float64), rounded to float32."""
    m, n = shape
    rng = np.random.default_rng(seed)
    k = sigma.size
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy(((u * sigma) @ v.T).astype(np.float32))


def bf16_delta(shape, seed: int, density: float = 0.3, scale: float = 3e-4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    moved = (torch.rand(shape, generator=g) < density) * torch.randn(shape, generator=g) * scale
    return (w0.float() + moved).to(torch.bfloat16) - w0


SHAPES = [(240, 240), (400, 200), (200, 400), (210, 240), (64, 400)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("where", [1.0, 1 - 1e-3, 1 + 1e-3, 1 - 1e-6, 1 + 1e-6])
def test_planted_at_threshold(shape, where):
    """Ten singular values at (or within 1e-3 / 1e-6 of) the threshold: the count equals numpy's float64
    SVD's. Rounding the planted matrix to float32 moves its σ by ~6e-8 (σmax = 1), 1e-3 of the threshold
    when min(m, n) < 200 where the band is that narrow too; from 200 up the band (~6%) must catch them."""
    side = min(shape)
    tol = max(shape) * EPS32
    sigma = np.linspace(1.0, 0.01, side)
    sigma[-20:] = tol * 1e-3          # clearly below
    sigma[-30:-20] = tol * where      # at the threshold (σmax = 1)
    delta = planted(shape, sigma, seed=side + int(where * 1e6))
    rank, _, exact = certified_rank(delta)
    assert rank == numpy_rank64(delta)
    if side >= 200 and abs(where - 1) < 1e-5:
        assert exact, "singular values at the threshold must fall inside the certified band"
    assert side - 30 <= rank <= side - 20


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_planted_clear_of_threshold(shape, factor):
    """Singular values a factor 2 from the threshold: certified from the Gram alone, and right."""
    side = min(shape)
    tol = max(shape) * EPS32
    sigma = np.linspace(1.0, 0.05, side)
    sigma[-15:] = tol * factor
    delta = planted(shape, sigma, seed=7 * side)
    rank, _, exact = certified_rank(delta)
    assert not exact
    assert rank == numpy_rank64(delta) == (side if factor > 1 else side - 15)
    assert rank == int(torch.linalg.matrix_rank(delta))


@pytest.mark.parametrize("shape", [(448, 64), (64, 448), (256, 256), (512, 128), (128, 512), (192, 160)])
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_like_deltas(shape, seed):
    delta = bf16_delta(shape, seed=seed + sum(shape), density=0.1 + 0.3 * seed)
    assert update_rank(delta) == numpy_rank64(delta) == int(torch.linalg.matrix_rank(delta.float()))


def test_low_rank_merged_and_exact():
    g = torch.Generator().manual_seed(11)
    exact = (torch.randn(700, 9, generator=g) @ torch.randn(9, 300, generator=g)) * 1e-3
    assert update_rank(exact) == numpy_rank64(exact) == 9
    assert update_rank(exact.T.contiguous()) == 9
    assert update_rank(torch.zeros(40, 70)) == 0


@pytest.mark.parametrize("shape", [(480, 160), (160, 480), (240, 240)])
def test_error_bound_holds(shape):
    """Every float64-Gram eigenvalue lies within η of σ_i² from numpy's float64 SVD (an independent
    computation whose own error, ~1e-16·σmax², is far below η)."""
    for seed in range(3):
        delta = bf16_delta(shape, seed=seed)
        g = cpu_gram(delta)
        sq = np.linalg.eigvalsh(g)
        eta = error_bound(g, sq, max(shape))
        s = np.linalg.svd(delta.float().numpy().astype(np.float64), compute_uv=False)
        assert np.max(np.abs(np.sort(sq) - np.sort(s * s))) <= eta
        assert eta < (max(shape) * EPS32) ** 2 * sq[-1]  # the band is narrower than the threshold itself


@pytest.mark.parametrize("chunk", [1 << 24, 2000])
def test_cpu_gram_is_the_gram(monkeypatch, chunk):
    """One block or many (2000 elements: 12 blocks of 28 rows), tall or wide: the float64 Gram of the smaller side."""
    monkeypatch.setattr(rank_mod, "CHUNK_ELEMENTS", chunk)
    delta = bf16_delta((333, 70), seed=3)
    d = delta.float().numpy().astype(np.float64)
    full = d.T @ d
    for got in (cpu_gram(delta), cpu_gram(delta.T), cpu_gram(delta.T.contiguous())):
        assert got.shape == (70, 70) and got.dtype == np.float64
        assert np.allclose(got, full, rtol=1e-12, atol=0)
        assert np.array_equal(got, got.T)


def test_band_contains_the_threshold():
    sq = np.array([0.0, 1e-9, 4.0])
    low, high = threshold_band(sq, 1e-12, 1e-4)
    assert low < 4.0 * 1e-8 < high
    assert high - low < 1e-11


def test_exact_route_in_chunks(monkeypatch):
    """The chunked QR (many row blocks) gives numpy's count and σ² on tall and wide matrices."""
    monkeypatch.setattr(rank_mod, "CHUNK_ELEMENTS", 1000)
    for shape in [(700, 40), (40, 700)]:
        sigma = np.linspace(1.0, 0.1, 40)
        sigma[-5:] = max(shape) * EPS32 * 0.9
        delta = planted(shape, sigma, seed=shape[0])
        rank, sq, = exact_route(delta)
        s = np.linalg.svd(delta.numpy().astype(np.float64), compute_uv=False)
        assert rank == numpy_rank64(delta) == 35
        assert np.allclose(np.sort(sq.numpy()), np.sort(s * s), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", [(300, 260), (96, 400)])
def test_cpu_figures_equal_the_cuda_route(shape):
    """The certified CPU figures and the CUDA route's (full float64 Gram, run here on the CPU) agree."""
    from rlsub_tui.compute.rank import _gram_route, update_rank_figures
    from rlsub_tui.records.spectrum import rank_figures

    delta = bf16_delta(shape, seed=9)
    ours = update_rank_figures(delta)
    cuda_like = rank_figures(*[x.numpy() if torch.is_tensor(x) else x for x in _gram_route(delta)])
    assert ours.rank == cuda_like.rank == numpy_rank64(delta)
    assert (ours.energy_rank_90, ours.energy_rank_99) == (cuda_like.energy_rank_90, cuda_like.energy_rank_99)
    assert ours.stable_rank == pytest.approx(cuda_like.stable_rank, rel=1e-9)
    assert ours.effective_rank == pytest.approx(cuda_like.effective_rank, rel=1e-9)
