"""Rank of an update matrix by PyTorch's float32 rule, certified on the CPU, and its spectrum's figures (spectrum.py).

The rank counts the singular values σ_i of Δ (the float32 matrix, exactly) above
σ_max · max(m, n) · eps32, PyTorch's default tolerance for `matrix_rank(Δ.float())` (science.md).
On the CPU it comes from the float64 Gram matrix's eigenvalues with a certificate (`certified_rank`):
a rigorous bound on their error, and a float64 SVD of Δ only when an eigenvalue lies within that
bound of the threshold. The Gram and its eigenvalues are numpy's (its bundled OpenBLAS and LAPACK's
syevd), which ran 1.4-2x faster than torch's on our CPU machine. On CUDA: float64 Gram eigenvalues thresholded at the rule squared (unchanged).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlsub_tui.records.spectrum import RankFigures, rank_figures
from rlsub_tui.util import device_route

EPS32 = torch.finfo(torch.float32).eps
U64 = 2.0 ** -53  # unit roundoff of float64
CHUNK_ELEMENTS = 1 << 24  # float64 working set per step: 128 MB


def gram(delta: torch.Tensor) -> torch.Tensor:
    """XᵀX (X = Δ when tall, Δᵀ when wide: the smaller side's Gram) in float64 on Δ's device, built in chunks."""
    side = min(delta.shape)
    out = torch.zeros((side, side), dtype=torch.float64, device=delta.device)
    for block in _long_side_chunks(delta):
        out.addmm_(block.T, block)
    return out


def _long_side_chunks(delta: torch.Tensor):
    """Δ as float64 row blocks X_k of X (X = Δ when tall, Δᵀ when wide), so that XᵀX = Σ X_kᵀ X_k."""
    m, n = delta.shape
    x = delta if m >= n else delta.T
    step = max(1, CHUNK_ELEMENTS // max(x.shape[1], 1))
    # float32 holds a bf16/fp16 value exactly, and float64 a float32 one: only a wider Δ is rounded to float32 first
    exact_in_float32 = x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    for start in range(0, x.shape[0], step):
        block = x[start:start + step]
        yield (block if exact_in_float32 else block.to(torch.float32)).to(torch.float64)


def cpu_gram(delta: torch.Tensor) -> np.ndarray:
    """The smaller side's float64 Gram XᵀX (X = Δ as float32, long side first), summed over row blocks of X.

    numpy computes each block's `b.T @ b` as a symmetric rank-k update (BLAS syrk: half a product's flops)
    and its bundled OpenBLAS ran this 1.6-2.1x faster than torch's float64 products on our CPU machine
    (BENCHMARKS.md).
    """
    out = tmp = None
    for block in _long_side_chunks(delta):
        b = block.numpy()
        if out is None:
            out = b.T @ b
            continue
        tmp = np.empty_like(out) if tmp is None else tmp
        np.matmul(b.T, b, out=tmp)
        out += tmp
    return out


def gamma(k: int) -> float:
    """Higham's γ_k = k·u / (1 − k·u) for float64."""
    return k * U64 / (1.0 - k * U64)


def error_bound(gram_matrix: np.ndarray, sq: np.ndarray, long_side: int) -> float:
    """A rigorous bound η on |λ̂_i − λ_i(XᵀX)| for the eigenvalues `sq` that eigvalsh returned for `gram_matrix`.

    Two parts, added (Weyl's inequality: a symmetric perturbation moves every eigenvalue by at most
    its 2-norm):
    - forming the Gram: each entry is an inner product of length k = `long_side` of exactly
      representable float64 numbers, so |Ĝ − G| ≤ γ_k·|X|ᵀ|X| entrywise for any order of summation
      (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, eq. (3.13); blocked
      and FMA GEMMs included), and ‖|X|ᵀ|X|‖₂ = ‖|X|‖₂² ≤ ‖X‖_F² = tr(G) ≤ tr(Ĝ)/(1 − γ_k)
      (the diagonal obeys the same entrywise bound);
    - the eigensolver: LAPACK's symmetric eigensolvers (Householder tridiagonalisation, then
      divide and conquer or QR) are normwise backward stable, the computed λ̂ being exact for
      Ĝ + F with ‖F‖₂ ≤ p(s)·u·‖Ĝ‖ (Wilkinson 1965; Higham 2002 §19.3; LAPACK Users' Guide §4.7,
      where p(s) "grows modestly"); here p(s) = s² with ‖Ĝ‖_F (≥ ‖Ĝ‖₂), s the Gram's side. ‖Ĝ‖_F is
      the 2-norm of Ĝ's exact eigenvalues, within √s·‖F‖₂ of ‖λ̂‖₂, hence ‖Ĝ‖_F ≤ ‖λ̂‖₂ / (1 − √s·s²·u).
    Every sum and norm taken here is itself rounded; the factor (1 + γ_{s²+k}) covers that.
    """
    side = gram_matrix.shape[0]
    trace = float(np.trace(gram_matrix))
    c = side * side * U64
    frob = float(np.linalg.norm(sq)) / (1.0 - math.sqrt(side) * c)
    forming = gamma(long_side) * trace / (1.0 - gamma(long_side))
    return (forming + c * frob) * (1.0 + gamma(side * side + long_side))


def threshold_band(sq: np.ndarray, eta: float, rel: float) -> tuple[float, float]:
    """Where an eigenvalue could be counted either way: [rel²·(λ̂max − η) − η, rel²·(λ̂max + η) + η].

    The exact threshold rel²·λmax lies in [rel²·(λ̂max − η), rel²·(λ̂max + η)] and each exact λ_i within
    η of its λ̂_i; an eigenvalue outside the band is on the same side of the threshold as its λ̂_i.
    """
    top = float(sq[-1])
    r2 = rel * rel
    return r2 * (top - eta) - eta, r2 * (top + eta) + eta


def exact_route(delta: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The rank and σ_i² from a float64 SVD of Δ (after a chunked float64 QR of the long side's rows).

    Householder QR and the SVD are backward stable in float64: their errors (~1e-16·σmax) are far
    below the float32 rule's threshold (≥ max(m,n)·1.2e-7·σmax), so this count is the float32 rule's
    rank of Δ up to ties within float64 rounding.
    """
    r = None
    for block in _long_side_chunks(delta):
        stacked = block if r is None else torch.cat([r, block])
        r = torch.linalg.qr(stacked, mode="r").R if stacked.shape[0] > stacked.shape[1] else stacked
    sigma = torch.linalg.svdvals(r)
    top = float(sigma.max()) if sigma.numel() else 0.0
    rank = int((sigma > top * max(delta.shape) * EPS32).sum()) if top > 0 else 0
    return rank, torch.flip(sigma * sigma, dims=(0,))


def certified_rank(delta: torch.Tensor, g: np.ndarray | None = None,
                   sq: np.ndarray | None = None) -> tuple[int, np.ndarray, bool]:
    """The float32 rule's rank of a CPU matrix, its σ_i² (ascending), and whether the exact route was needed.

    Float64 Gram eigenvalues with the bound η of `error_bound`; when an eigenvalue lies inside
    `threshold_band`, the count is taken from `exact_route` instead. `g`: Δ's cpu_gram, when already formed;
    `sq`: its eigenvalues (ascending) when already taken by a LAPACK symmetric eigensolver, with or without
    vectors (the bound holds for any normwise backward stable one).
    """
    g = cpu_gram(delta) if g is None else g
    sq = np.linalg.eigvalsh(g) if sq is None else sq  # LAPACK's syevd, values only
    if not np.diagonal(g).any():
        return 0, sq, False  # Δ = 0
    rel = max(delta.shape) * EPS32
    low, high = threshold_band(sq, error_bound(g, sq, max(delta.shape)), rel)
    if bool(((sq >= low) & (sq <= high)).any()):
        rank, exact = exact_route(delta)
        return rank, exact.numpy(), True
    return int((sq > high).sum()), sq, False


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


def gram_route_figures(delta: torch.Tensor, sq: torch.Tensor) -> RankFigures:
    """The CUDA route's rank figures from the Gram's eigenvalues `sq` (ascending), however they were taken."""
    rank, sq = _gram_route(delta, sq)
    return rank_figures(rank, sq.numpy())


def _gram_route(delta: torch.Tensor, sq: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
    """Eigenvalues of the float64 Gram matrix (σ_i²), thresholded at the float32 rule squared (the CUDA route);
    `sq`: those eigenvalues (ascending) when already taken."""
    sq = (torch.linalg.eigvalsh(gram(delta)) if sq is None else sq).cpu()
    top = float(sq[-1])
    if top <= 0.0:
        return 0, sq
    return int((sq > top * (max(delta.shape) * EPS32) ** 2).sum()), sq


def update_rank_figures(delta: torch.Tensor) -> RankFigures:
    """Default rank of a 2-D update (PyTorch's float32 tolerance) and its spectrum's figures, from one decomposition.

    CPU: `certified_rank` (float64 Gram eigenvalues, checked against a rigorous error bound; a float64
    SVD for the rare matrix with an eigenvalue at the threshold), 3.3x faster per layer than
    matrix_rank's float32 SVD on one thread (BENCHMARKS.md). CUDA: the Gram route, faster than gesvd for every
    shape (H200: 75 vs 115 ms at 1536^2, 78 vs 420 ms at 3584^2; gesvdj is inaccurate on large matrices).
    """
    if delta.ndim != 2:
        raise ValueError("update_rank needs a 2-D matrix")
    m, n = delta.shape
    if m == 0 or n == 0:
        return rank_figures(0, [])
    if device_route.cuda_route(delta.device.type):
        return gram_route_figures(delta, torch.linalg.eigvalsh(gram(delta)))
    rank, sq, _ = certified_rank(delta)
    return rank_figures(rank, sq)


def stacked_rank_figures(delta: torch.Tensor) -> RankFigures:
    """Rank and spectrum figures of a 2-D update; for a 3-D stack of expert matrices, each figure summed
    over the experts (so its ratio to E·min(m, n) is the experts' mean ratio) and their mean energy curve."""
    if delta.ndim != 3:
        return update_rank_figures(delta)
    return stacked_figures([update_rank_figures(d) for d in delta])


def stacked_figures(figs: list[RankFigures]) -> RankFigures:
    """A stack of expert matrices' figures as one: each summed over the experts, their mean energy curve."""
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
