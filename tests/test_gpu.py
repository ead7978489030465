"""The CUDA route gives the same numbers as the CPU route. On a GPU box (benchmarks/gpu_check.sh, which fails
loudly when a CUDA test is skipped there) the route runs on the GPU; without one it runs on the CPU with the
calls into torch.cuda left out (util.device_route), so CI checks the route's logic field by field. Tests of
what only a GPU has (its generator, pinned memory) are skipped without one."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict

import pytest
import torch
from synthetic import base_state, save, sparse_run

from rlsub_tui.checkpoints.checkpoint import open_checkpoint
from rlsub_tui.checkpoints.staging import PinnedStager, ready
from rlsub_tui.compute import engine, kernels
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.compute.rank import reference_rank, update_rank
from rlsub_tui.records.criteria import AnalysisOptions, Criterion
from rlsub_tui.util import device_route

GPU = torch.cuda.is_available()
ROUTE = "cuda" if GPU else "cpu"  # where the CUDA route runs here
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")

FLOAT_FIELDS = {"sum_abs_delta", "sq_delta", "sq_base"}  # float32 reductions: summation order differs
# their tolerance: a GPU reduces in a tree; the route on the CPU takes one float32 dot over its large chunks,
# where the CPU route sums bit-pattern histograms in float64 (measured: 1.6e-5 relative on a 768x512 bf16 matrix)
FLOAT_REL = 1e-5 if GPU else 1e-4
SPECTRUM_FLOATS = {"stable_rank", "effective_rank"}  # CPU: lower-block Gram (or a float64 SVD), CUDA: full Gram


@contextlib.contextmanager
def cuda_route(on: bool):
    """The CUDA route taken (on the GPU when there is one, else on the CPU), or the CPU route."""
    was = device_route.CUDA_ROUTE_ON_CPU
    device_route.CUDA_ROUTE_ON_CPU = on and not GPU
    try:
        yield
    finally:
        device_route.CUDA_ROUTE_ON_CPU = was


def run(root, device, k=3, **kw):
    """One analysis on the CPU route ('cpu') or the CUDA route ('cuda', 'cuda:0': on the CPU without a GPU)."""
    kw.setdefault("sweep", (1e-8, 1e-6, 1e-5))
    route = device.startswith("cuda")
    with cuda_route(route):
        a = Analysis(str(root / "base"), [str(root / f"run{i}") for i in range(k)],
                     AnalysisOptions(device=device if GPU or not route else "cpu", use_cache=False, **kw))
        a.run_all()
        a.close()
    a.result.route = "cuda" if route else "cpu"
    return a.result


def assert_same(cpu, gpu):
    """Every field of every tensor's record equal; float sums to 1e-5 relative."""
    assert gpu.route == "cuda" and cpu.route == "cpu" and cpu.device == "cpu"
    assert gpu.device.startswith("cuda") if GPU else gpu.device == "cpu"
    assert set(cpu.tensors) == set(gpu.tensors)
    for name, r in cpu.tensors.items():
        a, b = asdict(r), asdict(gpu.tensors[name])
        sa, sb = a.pop("subspaces"), b.pop("subspaces")  # overlaps from each route's own eigensolver
        assert [x[:5] for x in sa] == [x[:5] for x in sb], name
        assert [x[5:] for x in sa] == [pytest.approx(x[5:], abs=1e-5) for x in sb], name
        for ra, rb in zip(a.pop("runs"), b.pop("runs")):
            for f in FLOAT_FIELDS:
                x, y = ra.pop(f), rb.pop(f)
                assert x == pytest.approx(y, rel=FLOAT_REL, abs=1e-12) or (math.isnan(x) and math.isnan(y)), (name, f)
            for f in SPECTRUM_FLOATS:
                x, y = ra.pop(f), rb.pop(f)
                assert (x is None and y is None) or x == pytest.approx(y, rel=1e-5), (name, f)
            x, y = ra.pop("energy_curve"), rb.pop("energy_curve")  # from σ² of different routes
            assert (x is None and y is None) or x == pytest.approx(y, abs=1e-5), (name, "energy_curve")
            assert ra == rb, name
        assert a == b, name


def write(root, base, runs):
    save(base, root / "base")
    for i, r in enumerate(runs):
        save(r, root / f"run{i}")


def test_cuda_equals_cpu(tmp_path):
    b = base_state()
    write(tmp_path, b, [sparse_run(b, i, scale=3e-4) for i in range(3)])
    assert_same(run(tmp_path, "cpu"), run(tmp_path, "cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("criterion", [("atol", 1e-5), ("exact", 0.0), ("relative", 1e-3)])
def test_dtypes_criteria_multichunk_nonfinite(tmp_path, monkeypatch, dtype, criterion):
    """Ragged multi-chunk tensors (small chunks forced), every dtype and criterion, NaN/Inf planted."""
    monkeypatch.setattr(kernels, "CUDA_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1000)
    b = base_state(dtype=torch.float32)
    runs = [sparse_run(b, i, scale=3e-3) for i in range(3)]
    name = "model.layers.0.self_attn.q_proj.weight"
    b[name][0, 0] = float("nan")
    runs[1][name][1, 1] = float("inf")
    runs[2][name][2, 2] = float("-inf")
    cast = lambda s: {k: v.to(dtype) for k, v in s.items()}  # noqa: E731
    write(tmp_path, cast(b), [cast(r) for r in runs])
    kw = dict(criterion=Criterion(*criterion), sweep=(1e-8, 1e-5) if dtype != torch.float8_e4m3fn else ())
    assert_same(run(tmp_path, "cpu", **kw), run(tmp_path, "cuda:0", **kw))


def test_mixed_dtypes_and_common_rows(tmp_path):
    b = base_state()
    runs = [sparse_run(b, i, scale=3e-3) for i in range(3)]
    runs[1] = {k: v.float() for k, v in runs[1].items()}
    runs[2]["model.embed_tokens.weight"] = torch.cat([runs[2]["model.embed_tokens.weight"],
                                                      torch.zeros(5, 32, dtype=torch.bfloat16)])
    write(tmp_path, b, runs)
    assert_same(run(tmp_path, "cpu", common_rows=True), run(tmp_path, "cuda", common_rows=True))


@pytest.mark.parametrize("k", [15, 16])
def test_many_runs(tmp_path, k):
    """15 runs take the coded histogram path, 16 the pairwise one: both equal the CPU."""
    b = base_state(shapes={"model.layers.0.mlp.up_proj.weight": (96, 64), "model.norm.weight": (64,)})
    write(tmp_path, b, [sparse_run(b, i, scale=3e-3) for i in range(k)])
    assert_same(run(tmp_path, "cpu", k=k), run(tmp_path, "cuda", k=k))


def test_ranks_on_realistic_bf16_updates(tmp_path):
    """Near-square and long matrices with bf16 RL-like deltas: CUDA's Gram route equals the CPU reference."""
    shapes = {"a.weight": (512, 512), "b.weight": (768, 512), "c.weight": (2048, 256), "d.weight": (256, 1536)}
    b = base_state(shapes=shapes)
    write(tmp_path, b, [sparse_run(b, i, scale=2e-4, density=0.2) for i in range(2)])
    cpu, gpu = run(tmp_path, "cpu", k=2), run(tmp_path, "cuda", k=2)
    assert_same(cpu, gpu)
    assert all(s.rank is not None for t in gpu.tensors.values() for s in t.runs)


@needs_gpu
@pytest.mark.parametrize("shape,rank", [((4864, 896), 896), ((896, 4864), 37), ((2048, 2048), 2048),
                                        ((2048, 2048), 700)])
def test_gpu_rank_matches_gesvd(shape, rank):
    """Well-separated spectra (singular values in [1, 2], the rest exactly zero): the true rank is known."""
    g = torch.Generator(device="cuda").manual_seed(0)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, rank, device="cuda", generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, device="cuda", generator=g, dtype=torch.float64))
    s = 1 + torch.rand(rank, device="cuda", generator=g, dtype=torch.float64)
    delta = ((u * s) @ v.T * 1e-3).float()
    assert update_rank(delta) == reference_rank(delta) == rank


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_staging_through_small_slices(tmp_path, layout):
    """Tensors larger than all slices together, in many dtypes and with rows cut, arrive intact."""
    state = {"a": torch.randn(1000, 37), "b": torch.randn(333).to(torch.bfloat16),
             "c": torch.randn(64, 64).to(torch.float8_e4m3fn), "d": torch.randn(0, 4)}
    save(state, tmp_path / "ck", layout=layout)
    ck = open_checkpoint(str(tmp_path / "ck"))
    stager = PinnedStager(torch.device("cuda:0" if GPU else "cpu"), slice_bytes=4096, slices=3)
    for name, t in state.items():
        for rows in (None, 17):
            if rows and t.shape[0] < rows:
                continue
            got, event = stager.to_device(ck, name, rows)
            ready([got], event)
            want = t[:rows] if rows else t
            assert got.device.type == ROUTE and got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
            assert torch.equal(got.cpu().view(torch.uint8), want.contiguous().view(torch.uint8))
    stager.close()
    ck.close()


@needs_gpu
def test_analysis_pins_no_tensor(tmp_path, monkeypatch):
    """Pinned memory is the stager's fixed slices: no Tensor.pin_memory() (whose blocks stay cached)."""
    def refuse(self, *a, **k):
        raise AssertionError("pin_memory() called")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    b = base_state()
    write(tmp_path, b, [sparse_run(b, i) for i in range(2)])
    assert len(run(tmp_path, "cuda", k=2).tensors) == len(b)


def test_gpu_out_of_memory_falls_back_to_cpu(tmp_path, monkeypatch):
    b = base_state()
    write(tmp_path, b, [sparse_run(b, i, scale=3e-3) for i in range(3)])
    cpu = run(tmp_path, "cpu")
    real, seen = engine.compute_tensor, []

    def flaky(base, *a, **k):
        if device_route.cuda_route(base.device.type) and not seen:
            seen.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(base, *a, **k)

    monkeypatch.setattr(engine, "compute_tensor", flaky)
    gpu = run(tmp_path, "cuda")
    fell = [t for t in gpu.tensors.values() if any("GPU ran out of memory" in n for n in t.notes)]
    assert len(fell) == 1 and any("computed on the CPU after the GPU ran out" in n for n in gpu.notes)
    for t in fell:
        t.notes = [n for n in t.notes if "GPU ran out of memory" not in n]
    assert_same(cpu, gpu)


@pytest.mark.parametrize("k", [3, 64])
def test_cuda_equals_cpu_with_pair_dtypes_nonfinite_and_many_runs(k):
    """Per-pair comparison dtypes, NaN/Inf and K past the coded path give the CPU's numbers on the GPU."""
    from rlsub_tui.compute.masks import compute_tensor
    from rlsub_tui.records.criteria import Criterion

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
    for route in ("cpu", "cuda"):
        with cuda_route(route == "cuda"):
            device = ROUTE if route == "cuda" else "cpu"
            out[route] = compute_tensor(base.to(device), [r.to(device) for r in runs], Criterion(), sweep=(1e-6,),
                                        want_rank=False, dtypes=dtypes)
    cpu, gpu = out["cpu"], out["cuda"]
    assert [s.updated for s in gpu.runs] == [s.updated for s in cpu.runs]
    assert [s.nonfinite for s in gpu.runs] == [s.nonfinite for s in cpu.runs]
    assert [s.sweep for s in gpu.runs] == [s.sweep for s in cpu.runs]
    assert [s.sq_base for s in gpu.runs] == pytest.approx([s.sq_base for s in cpu.runs], rel=1e-6)
    assert gpu.both == cpu.both and gpu.agreement == cpu.agreement
    assert (gpu.multi, gpu.sign_agree) == (cpu.multi, cpu.sign_agree)


def test_the_route_run_here_is_the_cuda_route(tmp_path, monkeypatch):
    """What the CUDA route does differently is what runs: its chunk size, the Gram rank, staged reads, no
    pattern histograms, no worker processes; and the CPU route is untouched once the switch is off."""
    import rlsub_tui.compute.accumulate as accumulate
    import rlsub_tui.compute.rank as rank
    from rlsub_tui.checkpoints import staging

    seen = {"gram": 0, "staged": 0, "pattern": 0}
    for module, name, key in ((rank, "_gram_route", "gram"), (staging.PinnedStager, "to_device", "staged"),
                              (accumulate.PatternRun, "add", "pattern")):
        real = getattr(module, name)

        def counted(*a, _real=real, _key=key, **k):
            seen[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(module, name, counted)
    monkeypatch.setattr(accumulate, "PATTERN_MIN_NUMEL", 0)  # the CPU route would count bf16 by patterns
    b = base_state()
    write(tmp_path, b, [sparse_run(b, i, scale=3e-3) for i in range(2)])
    run(tmp_path, "cuda", k=2, workers=2)
    assert seen["gram"] > 0 and seen["staged"] > 0 and seen["pattern"] == 0
    with cuda_route(True):
        assert kernels.chunk_elements(torch.device(ROUTE), 3) == kernels.CUDA_CHUNK_ELEMENTS
    seen.update(gram=0, staged=0, pattern=0)
    run(tmp_path, "cpu", k=2)
    assert seen == {"gram": 0, "staged": 0, "pattern": seen["pattern"]} and seen["pattern"] > 0


def test_the_route_ranks_an_unchanged_matrix_zero():
    """The Gram route on an all-zero update (a run that left a matrix alone): rank 0, as the CPU route gives."""
    from rlsub_tui.compute.rank import update_rank_figures

    zero = torch.zeros(64, 48, device=ROUTE)
    with cuda_route(True):
        routed = update_rank_figures(zero)
    assert routed.rank == 0 == update_rank_figures(zero.cpu()).rank
