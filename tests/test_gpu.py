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


@pytest.mark.parametrize("k", [3, 64])
def test_cuda_equals_cpu_with_pair_dtypes_nonfinite_and_many_runs(k):
    """Per-pair comparison dtypes, NaN/Inf and K past the coded path give the CPU's numbers on the GPU."""
    from rlsub_tui.masks import Criterion, compute_tensor

    g = torch.Generator().manual_seed(k)
    base = torch.randn(40, 24, generator=g) * 0.05
    base[0, 0] = float("nan")
    runs, dtypes = [], []
    for j in range(k):
        r = base + (torch.rand(base.shape, generator=g) < 0.4) * torch.randn(base.shape, generator=g) * 1e-3
        r[1, j % 24] = float("inf")
        dt = torch.bfloat16 if j % 2 else torch.float32
        runs.append(r.to(dt))
        dtypes.append(dt)
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = compute_tensor(base.to(device), [r.to(device) for r in runs], Criterion(), sweep=(1e-6,),
                                     want_rank=False, dtypes=dtypes)
    cpu, gpu = out["cpu"], out["cuda"]
    assert [s.updated for s in gpu.runs] == [s.updated for s in cpu.runs]
    assert [s.nonfinite for s in gpu.runs] == [s.nonfinite for s in cpu.runs]
    assert [s.sweep for s in gpu.runs] == [s.sweep for s in cpu.runs]
    assert [s.sq_base for s in gpu.runs] == pytest.approx([s.sq_base for s in cpu.runs], rel=1e-6)
    assert gpu.both == cpu.both and gpu.agreement == cpu.agreement
    assert (gpu.multi, gpu.sign_agree) == (cpu.multi, cpu.sign_agree)
