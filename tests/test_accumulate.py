"""The per-chunk accumulator: every path (16-bit patterns, float, state codes, run codes, pairwise) against numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import reference
import torch
from routes import check_route, force_route

from rlsub_tui.compute import accumulate, kernels
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.records.criteria import MAG_BINS, Criterion

NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _tensors(k: int, dtype: torch.dtype, n: int = 3000, seed: int = 0):
    """A base and k runs in `dtype`: sparse steps around the dtype's resolution, ±0, NaN/Inf planted."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.05
    base[:7] = torch.tensor([0.0, -0.0, 1e-30, -3e-6, 70000.0, float("nan"), 2.0])
    runs = []
    for j in range(k):
        pick = torch.rand(n, generator=g) < 0.4
        step = torch.randn(n, generator=g) * torch.tensor([1e-6, 1e-5, 1e-4, 1e-3])[torch.randint(0, 4, (n,), generator=g)]
        r = base + pick * step
        r[1] = 0.0  # -0 -> +0: the stored values differ, Δ is zero
        r[10 + j] = [float("inf"), float("-inf"), float("nan")][j % 3]
        r[20:25] = base[20:25] + 1e-3 * (1 if j % 2 else -1)  # several runs, signs that disagree
        r[30:35] = base[30:35] + 1e-3  # every run, same sign
        runs.append(r.to(dtype))
    return base.to(dtype), runs


def _expected(base, runs, dtype, criterion, sweep):
    name = NAMES[dtype]
    b = base.float().numpy()
    rs = [r.float().numpy() for r in runs]
    ms = [reference.mask(b, r, name, criterion.name, criterion.value) for r in rs]
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf: the NaN Δ the test plants
        ds = [reference.stored_delta(b, r, name) for r in rs]
    exp = reference.pooled([[m] for m in ms], [[d] for d in ds])
    with np.errstate(invalid="ignore"):
        finite = [np.isfinite(d) for d in ds]
        unsigned = ~np.all(finite, axis=0)
        count = np.sum(ms, axis=0)
        pos = np.sum([m & (d > 0) for m, d in zip(ms, ds)], axis=0)
        neg = np.sum([m & (d < 0) for m, d in zip(ms, ds)], axis=0)
    several = (count >= 2) & ~unsigned
    exp["multi"] = int(several.sum())
    exp["sign_agree"] = int((several & ((pos == count) | (neg == count))).sum())
    exp["nonfinite"] = [int((~f).sum()) for f in finite]
    exp["sum_abs"] = [float(np.abs(np.where(f, d, 0)).astype(np.float64).sum()) for d, f in zip(ds, finite)]
    exp["sq_delta"] = [float((np.where(f, d, 0).astype(np.float64) ** 2).sum()) for d, f in zip(ds, finite)]
    exp["sq_base"] = [float((np.where(f, b, 0).astype(np.float64) ** 2).sum()) for f in finite]
    exp["sweep"] = [[int(((np.abs(np.where(f, d, 0)) > reference.tolerance_in(name, t)) | ~f).sum()) for t in sweep]
                    for d, f in zip(ds, finite)]
    bins = reference.exponent_stratum(b) + 26  # strata -26..3 are bins 0..29
    bins[~np.isfinite(b)] = MAG_BINS - 1  # a NaN/Inf w0 has the largest exponent: the top bin
    exp["magnitude_numel"] = np.bincount(bins, minlength=MAG_BINS).tolist()
    exp["magnitude_updated"] = [np.bincount(bins[m], minlength=MAG_BINS).tolist() for m in ms]
    codes = sum(m.astype(np.int64) << j for j, m in enumerate(ms))
    exp["run_codes"] = np.bincount(codes, minlength=1 << len(runs)).tolist() if len(runs) <= 10 else []
    return exp


@pytest.mark.parametrize("k", [1, 3, 6, 7, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("criterion", [Criterion("atol", 1e-5), Criterion("exact", 0.0), Criterion("atol", 0.0),
                                       Criterion("relative", 1e-2)])
@pytest.mark.cpu_route
@pytest.mark.parametrize("patterns", [True, False], ids=["patterns", "float"])
@pytest.mark.parametrize("route", ["all", "changed"])
def test_every_path_matches_numpy(monkeypatch, k, dtype, criterion, patterns, route):
    """Several ragged chunks; the pattern path forced on (or off) whatever the tensor's size, and chunks
    counted on every position or on the changed ones alone."""
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(accumulate, "PATTERN_MIN_NUMEL", 0 if patterns else 1 << 62)
    skipped = force_route(monkeypatch, route)
    sweep = (0.0, 1e-8, 1e-6, 1e-5, 1e-3)
    base, runs = _tensors(k, dtype, seed=k)
    comp = compute_tensor(base, runs, criterion, sweep, want_rank=False)
    check_route(skipped, route, patterns and dtype != torch.float32 and criterion.name != "relative"
                 and k <= kernels.MAX_CODED_RUNS)
    exp = _expected(base, runs, dtype, criterion, sweep)
    assert [s.updated for s in comp.runs] == exp["updated"]
    assert [s.nonfinite for s in comp.runs] == exp["nonfinite"]
    assert [s.sweep for s in comp.runs] == exp["sweep"]
    assert comp.agreement == exp["agreement"]
    assert {p: n for p, n in comp.both.items()} == {p: v["both"] for p, v in exp["pairs"].items()}
    assert (comp.multi, comp.sign_agree) == (exp["multi"], exp["sign_agree"])
    assert comp.sign_agree > 0 and comp.multi > comp.sign_agree or k == 1
    assert comp.magnitude_numel == exp["magnitude_numel"]
    assert [s.magnitude_updated for s in comp.runs] == exp["magnitude_updated"]
    assert comp.run_codes == exp["run_codes"]
    for j, s in enumerate(comp.runs):
        assert s.sum_abs_delta == pytest.approx(exp["sum_abs"][j], rel=1e-6)
        assert s.sq_delta == pytest.approx(exp["sq_delta"][j], rel=1e-6)
        assert s.sq_base == pytest.approx(exp["sq_base"][j], rel=1e-6)


@pytest.mark.cpu_route
def test_pattern_path_is_taken_for_large_16bit_tensors_only():
    cpu = torch.device("cpu")
    acc = accumulate.TensorAccumulator(torch.bfloat16, [torch.bfloat16, torch.float32, torch.float16],
                                       Criterion(), (), cpu, accumulate.PATTERNS)
    assert [type(a).__name__ for a in acc.per_run] == ["PatternRun", "FloatRun", "PatternRun"]
    small = accumulate.TensorAccumulator(torch.bfloat16, [torch.bfloat16], Criterion(), (), cpu, 100)
    relative = accumulate.TensorAccumulator(torch.bfloat16, [torch.bfloat16], Criterion("relative", 1e-3), (), cpu,
                                            accumulate.PATTERNS)
    assert type(small.per_run[0]).__name__ == type(relative.per_run[0]).__name__ == "FloatRun"


def test_mixed_pair_dtypes_on_a_large_tensor_match_numpy():
    """An fp32 base with bf16, fp16 and fp32 runs, each compared in its pair's dtype, past PATTERN_MIN_NUMEL."""
    g = torch.Generator().manual_seed(5)
    n = accumulate.PATTERNS + 4321
    base = torch.randn(n, generator=g) * 0.05
    base[3] = float("inf")
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    runs = [(base + (torch.rand(n, generator=g) < 0.3) * torch.randn(n, generator=g) * 1e-3).to(dt) for dt in dtypes]
    comp = compute_tensor(base, runs, Criterion(), (1e-6,), want_rank=False, dtypes=dtypes)
    for j, (dt, r) in enumerate(zip(dtypes, runs)):
        name = NAMES[dt]
        b = base.to(dt).float().numpy()
        m = reference.mask(b, r.float().numpy(), name)
        with np.errstate(invalid="ignore", over="ignore"):
            d = reference.stored_delta(b, r.float().numpy(), name)
            f = np.isfinite(d)
        assert comp.runs[j].updated == int(m.sum()) and comp.runs[j].nonfinite == int((~f).sum()) == 1
        assert comp.runs[j].sum_abs_delta == pytest.approx(float(np.abs(d[f]).astype(np.float64).sum()), rel=1e-6)
        # Σw0² is a float32 dot product (as before this change), so a 70k-element sum is good to ~1e-5
        assert comp.runs[j].sq_base == pytest.approx(float((b[f].astype(np.float64) ** 2).sum()), rel=1e-5)


@pytest.mark.cpu_route
@pytest.mark.parametrize("k", [1, 3, 6, 7, 16])
@pytest.mark.parametrize("patterns", [True, False], ids=["patterns", "float"])
@pytest.mark.parametrize("route", ["all", "changed"])
def test_rows_columns_and_distance_on_every_path(monkeypatch, k, patterns, route):
    """A 60x50 bf16 matrix in ragged chunks that cut rows: each run's rows and columns holding an update and
    its distance-to-visibility histogram, against numpy, for every cross-run layout (state codes, run codes,
    pairwise) and both per-run paths."""
    from rlsub_tui.records.criteria import ULP_BINS, ULP_LOG2_MAX, ULP_LOG2_MIN

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(accumulate, "PATTERN_MIN_NUMEL", 0 if patterns else 1 << 62)
    skipped = force_route(monkeypatch, route)
    m, n = 60, 50
    flat_base, flat_runs = _tensors(k, torch.bfloat16, n=m * n, seed=k)
    base = flat_base.reshape(m, n)
    runs = []
    for j, r in enumerate(flat_runs):
        r = r.reshape(m, n).clone()
        r[40 + j % 20, :] = base[40 + j % 20, :]  # a row this run leaves alone
        r[:, 49 - j % 10] = base[:, 49 - j % 10]  # and a column
        runs.append(r)
    comp = compute_tensor(base, runs, Criterion("atol", 1e-5), (), want_rank=False)
    check_route(skipped, route, patterns and k <= kernels.MAX_CODED_RUNS)
    b = base.float().numpy()
    for j, (r, s) in enumerate(zip(runs, comp.runs)):
        mask = reference.mask(b, r.float().numpy(), "bf16", "atol", 1e-5)
        assert (s.rows_updated, s.cols_updated) == (int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum()))
        assert s.rows_updated < m and s.cols_updated < n
        with np.errstate(invalid="ignore", over="ignore"):
            d = reference.stored_delta(b, r.float().numpy(), "bf16").astype(np.float64)
            counted = mask & np.isfinite(d)
        w = np.abs(b[counted]).astype(np.float64)
        _, e = np.frexp(w)  # |w| = f·2^e, f in [0.5, 1): ULP_bf16(w) = 2^(e - 1 - 7); zeros, subnormals 2^-133
        ulp = np.where(w < np.finfo(np.float32).tiny, 2.0 ** -133, np.ldexp(1.0, e - 8))
        _, e = np.frexp(np.abs(d[counted]) / ulp)
        want = np.bincount(np.clip(e - 1, ULP_LOG2_MIN, ULP_LOG2_MAX) - ULP_LOG2_MIN, minlength=ULP_BINS)
        assert s.ulp_histogram == want.tolist() and sum(want) > 0


@pytest.mark.cpu_route
@pytest.mark.parametrize("criterion", [Criterion("atol", 1e-5), Criterion("exact")])
def test_pairs_of_several_dtypes_on_one_bf16_base(monkeypatch, criterion):
    """One bf16 base, runs compared in bf16 (its distance key carried in the state words), fp32 and fp16 (the
    float path beside it, in the same cross-run key), over chunks that cut rows; the fp32 run has a NaN and,
    in one chunk only, a subnormal Δ (that chunk's distances through frexp, the others from exponent bits).
    Rows, columns, distance histograms and bf16 visibility per run, against numpy."""
    from rlsub_tui.compute import precision
    from rlsub_tui.records.criteria import ULP_BINS, ULP_LOG2_MAX, ULP_LOG2_MIN

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(accumulate, "PATTERN_MIN_NUMEL", 0)
    routes = []  # per fp32/fp16 chunk: distances from exponent bits (True) or through frexp (False)
    real = precision.PrecisionAccumulator._add_keys
    monkeypatch.setattr(precision.PrecisionAccumulator, "_add_keys",
                        lambda self, *a: routes.append(real(self, *a)) or routes[-1])
    g = np.random.default_rng(7)
    m, n = 60, 50
    w0 = torch.from_numpy((g.standard_normal((m, n)) * 0.05).astype(np.float32)).to(torch.bfloat16)
    w0[0, 0] = 0.0
    b = w0.float().numpy()
    steps = [(g.standard_normal((m, n)) * 3e-4 * (g.random((m, n)) < 0.4)).astype(np.float32) for _ in range(3)]
    bf16_run = torch.from_numpy(b + steps[0]).to(torch.bfloat16)
    fp32 = b + steps[1]
    fp32[0, 0] = 3e-42  # Δ subnormal in float32, in the first chunk only
    fp32[50, 7] = np.nan
    fp32_run = torch.from_numpy(fp32)
    fp16_run = torch.from_numpy(b + steps[2]).to(torch.float16)
    for r in (bf16_run, fp32_run, fp16_run):
        r[45, :] = w0[45, :].to(r.dtype)  # a row every run leaves alone
    dtypes = [torch.bfloat16, torch.float32, torch.float16]
    acc_types = accumulate.TensorAccumulator(torch.bfloat16, dtypes, criterion, (), torch.device("cpu"), m * n,
                                             shape=(m, n))
    assert [type(a).__name__ for a in acc_types.per_run] == ["PatternRun", "FloatRun", "PatternRun"]
    assert acc_types.carried
    comp = compute_tensor(w0, [bf16_run, fp32_run, fp16_run], criterion, want_rank=False, dtypes=dtypes)
    frexp = 1 if criterion.name == "exact" else 0  # under atol 1e-5 the subnormal Δ is no update
    assert routes.count(False) == frexp and routes.count(True) == 2 * 3 - frexp  # 3 chunks, 2 runs
    for s, r, name in zip(comp.runs, (bf16_run, fp32_run, fp16_run), ("bf16", "fp32", "fp16")):
        base_as = torch.from_numpy(b).to(r.dtype).float().numpy()  # the base as the pair compares it
        rn = r.float().numpy()
        upd = reference.mask(base_as, rn, name, criterion.name, criterion.value)
        assert (s.rows_updated, s.cols_updated) == (int(upd.any(axis=1).sum()), int(upd.any(axis=0).sum()))
        with np.errstate(invalid="ignore"):
            d = reference.stored_delta(base_as, rn, name).astype(np.float64)
        counted = upd & np.isfinite(d)
        w = np.abs(base_as[counted]).astype(np.float64)
        _, e = np.frexp(w)
        ulp = np.where(w < np.finfo(np.float32).tiny, 2.0 ** -133, np.ldexp(1.0, e - 8))
        _, e = np.frexp(np.abs(d[counted]) / ulp)
        want = np.bincount(np.clip(e - 1, ULP_LOG2_MIN, ULP_LOG2_MAX) - ULP_LOG2_MIN, minlength=ULP_BINS)
        assert s.ulp_histogram == want.tolist(), name
        if name == "bf16":
            assert s.updated_bf16_visible is None
            continue
        with np.errstate(invalid="ignore"):
            visible = torch.from_numpy(base_as).to(torch.bfloat16) != torch.from_numpy(rn).to(torch.bfloat16)
        assert s.updated_bf16_visible == int(visible.sum()), name
        assert s.hidden_by_bf16 == int((torch.from_numpy(upd) & ~visible).sum()), name


@pytest.mark.cpu_route
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_changed_positions_alone_give_every_figure_of_all_positions(monkeypatch, k, dtype):
    """A 2-D tensor in ragged chunks, some with no change at all, a NaN and a zero in the base, Δ = -0 and NaN
    in runs: every figure (counts, sums, strata, codes, rows, columns, distances, bf16 visibility) is the same
    whether the chunks are counted on every position or on the changed ones alone; and bf16 visibility of the
    fp16 pairs against numpy."""
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(accumulate, "PATTERN_MIN_NUMEL", 0)
    g = np.random.default_rng(3 + k)
    m, n = 90, 70
    a = (g.standard_normal((m, n)) * 0.05).astype(np.float32)
    a[0, 0], a[0, 1], a[0, 2] = np.nan, 0.0, -0.0
    base = torch.from_numpy(a).to(dtype)
    runs = []
    for j in range(k):
        step = (g.standard_normal((m, n)) * 3e-4 * (g.random((m, n)) < 0.2)).astype(np.float32)
        step[20:45, :] = 0.0  # whole chunks (1000..2999) no run changes
        r = (base.float() + torch.from_numpy(step)).to(dtype)
        r[0, 2] = 0.0  # +0 - (-0): Δ = +0, no change
        r[0, 1] = -0.0  # -0 - (+0): Δ = -0, no change
        r[60 + j, 5] = float("nan")
        runs.append(r)
    results = {}
    for route in ("all", "changed"):
        skipped = force_route(monkeypatch, route)
        results[route] = compute_tensor(base, runs, Criterion("atol", 1e-5), (1e-6, 1e-4), want_rank=False)
        check_route(skipped, route, True)
    assert dataclasses.asdict(results["all"]) == dataclasses.asdict(results["changed"])
    comp = results["changed"]
    assert comp.runs[0].nonfinite == 2 and comp.runs[0].updated < m * n // 4
    b = base.float().numpy()
    for r, s in zip(runs, comp.runs):
        with np.errstate(invalid="ignore"):
            d = (r.float().numpy() - b)  # the stored Δ's zeros are the difference's zeros
            sq_base = float((np.where(np.isfinite(d), b, 0).astype(np.float64) ** 2).sum())
        assert s.sq_base == pytest.approx(sq_base, rel=1e-12)
        if dtype == torch.float16:
            visible = base.to(torch.bfloat16) != r.to(torch.bfloat16)
            assert s.updated_bf16_visible == int(visible.sum())


@pytest.mark.cpu_route
@pytest.mark.parametrize("route", ["all", "changed"])
@pytest.mark.parametrize("dtype,big", [(torch.bfloat16, 1e30), (torch.bfloat16, 1e10), (torch.float16, 60000.0)])
def test_sq_base_keeps_small_weights_beside_a_large_one_with_a_nonfinite_delta(monkeypatch, route, dtype, big):
    """Σw0² leaves out the positions whose Δ is NaN/Inf without cancelling the rest: a large weight dropped
    beside thousands of small ones (a sum minus the dropped w0² in float64 gave 0.0 for bf16's 1e30)."""
    monkeypatch.setattr(accumulate, "PATTERN_MIN_NUMEL", 0)
    skipped = force_route(monkeypatch, route)
    n = 4096
    base = torch.full((n,), 0.01).to(dtype)
    base[0] = big
    run = base.clone()
    run[0] = float("nan")
    run[1:100] += 0.01
    s = compute_tensor(base, [run], Criterion("atol", 1e-5), (), want_rank=False).runs[0]
    check_route(skipped, route, True)
    b = base.double().numpy()
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(run.double().numpy() - b)
    assert s.nonfinite == 1
    assert s.sq_base == pytest.approx(float((b[finite] ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int32, np.int64, "bool", "torch-int64", "torch-bool"])
def test_bincount_helper_counts_as_numpy_does(dtype):
    """kernels.bincount (torch.bincount on the CPU, every input widened as needed) against np.bincount: 16-bit
    patterns above 2^15 (negative as int16), keys above the minimum length, an empty array."""
    rng = np.random.default_rng(1)
    high = {np.uint16: 1 << 16, np.uint8: 256, "bool": 2, "torch-bool": 2}.get(dtype, 70_000)
    values = rng.integers(0, high, 5_001)
    if dtype in ("torch-int64", "torch-bool"):
        x = torch.from_numpy(values) if dtype == "torch-int64" else torch.from_numpy(values.astype(bool))
    else:
        x = values.astype(bool if dtype == "bool" else dtype)
    for minlength in (2, 1 << 16, 80_000):
        got = kernels.bincount(x, minlength)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.bincount(values, minlength=minlength))
    np.testing.assert_array_equal(kernels.bincount(np.zeros(0, np.uint16), 5), np.zeros(5, np.int64))
