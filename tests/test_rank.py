"""The Gram-route rank equals torch.linalg.matrix_rank(delta.float()) on realistic shapes."""

from __future__ import annotations

import pytest
import torch
from reference import numpy_rank

from rlsub_tui.compute.rank import update_rank


@pytest.mark.parametrize("shape,rank", [
    ((896, 128), 7),        # exact low rank, tall
    ((128, 896), 31),       # exact low rank, wide
    ((1024, 256), 256),     # full rank
    ((256, 1376), 256),     # full rank, wide
    ((300, 300), 0),        # no update at all
])
def test_rank_matches_matrix_rank(shape, rank):
    g = torch.Generator().manual_seed(sum(shape) + rank)
    m, n = shape
    if rank:
        delta = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) * 1e-3
    else:
        delta = torch.zeros(m, n)
    got = update_rank(delta)
    assert got == int(torch.linalg.matrix_rank(delta)) == rank
    assert got == numpy_rank(delta.numpy())


def test_sparse_bf16_update_like_rl():
    """A sparse bf16 update of a real layer's shape: nearly full rank, equal by both methods."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(896, 512, generator=g) * 0.02).to(torch.bfloat16)
    mask = torch.rand(base.shape, generator=g) < 0.2
    run = (base.float() + mask * torch.randn(base.shape, generator=g) * 3e-4).to(torch.bfloat16)
    delta = run - base
    assert update_rank(delta) == int(torch.linalg.matrix_rank(delta.float()))


def test_near_threshold_spectrum():
    """Singular values straddling the tolerance, not too close to it: both methods count the same."""
    g = torch.Generator().manual_seed(5)
    m, n = 600, 200
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    tol_rel = max(m, n) * torch.finfo(torch.float32).eps
    s = torch.ones(n, dtype=torch.float64)
    s[150:] = tol_rel * 1e-2   # well below the tolerance
    s[100:150] = tol_rel * 1e2  # well above
    delta = ((u * s) @ v.T).float()
    assert update_rank(delta) == int(torch.linalg.matrix_rank(delta)) == 150
    assert update_rank(delta) == numpy_rank(delta.numpy())
