import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own result cache, never the user's."""
    monkeypatch.setenv("RLSUB_TUI_CACHE_DIR", str(tmp_path / "user-cache"))


@pytest.fixture(autouse=True)
def cpu_unless_gpu_test(request, monkeypatch):
    """On a GPU box every test but tests/test_gpu.py runs as on CI's CPU-only machine (device auto -> cpu),
    so snapshots, which name the device, and timings do not depend on the box; tests/test_gpu.py and
    benchmarks/gpu_check.sh check the CUDA path against the CPU path there."""
    if request.module.__name__ != "test_gpu":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def checkpoints(tmp_path):
    """A base and three sparse seed runs (seed0, seed1, seed2) of the synthetic model, as safetensors."""
    from synthetic import base_state, save, sparse_run

    b = base_state()
    save(b, tmp_path / "base")
    for s in range(3):
        save(sparse_run(b, s), tmp_path / f"seed{s}")
    return tmp_path
