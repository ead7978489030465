"""The CUDA path gives the same numbers as the CPU path (skipped where torch sees no GPU)."""

from __future__ import annotations

import pytest
import torch

from synthetic import base_state, save, sparse_run
from rlsub_tui.engine import Analysis, AnalysisOptions
from rlsub_tui.rank import reference_rank, update_rank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(tmp_path, device):
    a = Analysis(str(tmp_path / "base"), [str(tmp_path / f"run{i}") for i in range(3)],
                 AnalysisOptions(device=device, use_cache=False, sweep=(1e-8, 1e-6, 1e-5)))
    a.run_all()
    a.close()
    return a.result


def test_cuda_equals_cpu(tmp_path):
    b = base_state()
    save(b, tmp_path / "base")
    for i in range(3):
        save(sparse_run(b, i, scale=3e-4), tmp_path / f"run{i}")
    cpu, gpu = run(tmp_path, "cpu"), run(tmp_path, "cuda")
    assert gpu.device.startswith("cuda")
    for name, r in cpu.tensors.items():
        g = gpu.tensors[name]
        assert [s.updated for s in g.runs] == [s.updated for s in r.runs]
        assert [s.sweep for s in g.runs] == [s.sweep for s in r.runs]
        assert [s.rank for s in g.runs] == [s.rank for s in r.runs]
        assert g.both == r.both and g.agreement == r.agreement and g.sign_agree == r.sign_agree


@pytest.mark.parametrize("shape,rank", [((4864, 896), 896), ((896, 4864), 37), ((2048, 2048), 2048)])
def test_gpu_rank_matches_gesvd(shape, rank):
    """Well-separated spectra (singular values in [1, 2], the rest exactly zero): the true rank is known."""
    g = torch.Generator(device="cuda").manual_seed(0)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, rank, device="cuda", generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, device="cuda", generator=g, dtype=torch.float64))
    s = 1 + torch.rand(rank, device="cuda", generator=g, dtype=torch.float64)
    delta = ((u * s) @ v.T * 1e-3).float()
    assert update_rank(delta) == reference_rank(delta) == rank
