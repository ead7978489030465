"""Precision visibility (bf16-visible updates, the hidden share, the distance to visibility) against numpy."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from routes import check_route, force_route
from safetensors.numpy import load_file
from synthetic import save

from rlsub_tui.checkpoints.sample_paths import sample_dir
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.compute.precision import PrecisionAccumulator
from rlsub_tui.export.outputs import write_outputs
from rlsub_tui.records.criteria import ULP_BINS, ULP_LOG2_MAX, ULP_LOG2_MIN, AnalysisOptions, Criterion


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 value (ties to even), as float32: bit arithmetic, no torch."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def ulp_bf16(w: np.ndarray) -> np.ndarray:
    """2^(floor(log2 |w|) − 7) for normal w; zeros and subnormals the bf16 subnormal spacing 2^-133."""
    _, e = np.frexp(np.abs(w).astype(np.float64))  # |w| = m·2^e, m in [0.5, 1): floor(log2|w|) = e − 1
    ulp = np.ldexp(1.0, e - 1 - 7)
    return np.where(np.abs(w) < np.finfo(np.float32).tiny, 2.0 ** -133, ulp)


def oracle(w0: np.ndarray, w1: np.ndarray, updated: np.ndarray, fine: bool = True) -> dict:
    """Visible, hidden and the histogram of floor(log2(|Δ|/ULP_bf16(w0))) over true updates, in float64."""
    delta = np.abs(w1.astype(np.float64) - w0.astype(np.float64))
    visible = bf16_round(w0) != bf16_round(w1)
    ratio = delta[updated] / ulp_bf16(w0[updated])  # an exact division by a power of two
    _, e = np.frexp(ratio)
    x = np.clip(e - 1, ULP_LOG2_MIN, ULP_LOG2_MAX)
    hist = np.bincount(x - ULP_LOG2_MIN, minlength=ULP_BINS)
    return {"visible": int(visible.sum()) if fine else None,
            "hidden": int((updated & ~visible).sum()) if fine else None, "hist": hist.tolist(), "ratio": ratio}


@pytest.mark.parametrize("criterion", [Criterion("exact"), Criterion("atol", 1e-5)])
def test_bundled_fp32_pair_against_numpy(criterion, tmp_path):
    root = sample_dir()
    base = load_file(str(root / "base-fp32" / "model.safetensors"))
    run = load_file(str(root / "fp32-grpo-lowlr-seed1" / "model.safetensors"))
    a = Analysis(str(root / "base-fp32"), [str(root / "fp32-grpo-lowlr-seed1")],
                 AnalysisOptions(criterion=criterion, rank=False, use_cache=False))
    result = a.run_all()
    a.close()
    tol = np.float32(criterion.value)
    totals = {"updated": 0, "hidden": 0, "visible": 0}
    pooled_hist = np.zeros(ULP_BINS, dtype=np.int64)
    for name, r in result.tensors.items():
        w0, w1 = base[name], run[name]
        d32 = w1 - w0  # float32, as stored
        updated = (w1 != w0) if criterion.name == "exact" else (np.abs(d32) > tol)
        want = oracle(w0, w1, updated)
        s = r.runs[0]
        assert s.updated == int(updated.sum()), name
        assert (s.updated_bf16_visible, s.hidden_by_bf16) == (want["visible"], want["hidden"]), name
        assert s.ulp_histogram == want["hist"], name
        totals["updated"] += s.updated
        totals["hidden"] += want["hidden"]
        totals["visible"] += want["visible"]
        pooled_hist += want["hist"]
    stats = result.stats()
    assert stats.hidden_by_bf16(0) == pytest.approx(totals["hidden"] / totals["updated"], rel=1e-12)
    assert stats.bf16_visible_count(0) == totals["visible"]
    assert stats.ulp_histogram[0].tolist() == pooled_hist.tolist()
    assert 0 < totals["hidden"] < totals["updated"]  # the sample has both kinds: the test can tell them apart
    from rlsub_tui.cli.report import summary_text

    share = 100 * totals["hidden"] / totals["updated"]
    text = summary_text(result)
    assert "hid bf16: true updates with bf16(w1) = bf16(w0)" in text
    row = next(line for line in text.splitlines() if line.startswith("fp32-grpo-lowlr-seed1 "))
    assert f"{share:.1f}%" in row.split()  # the run's hid bf16 column
    write_outputs(result, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())["runs"][0]
    assert summary["hidden_by_bf16"] == pytest.approx(totals["hidden"] / totals["updated"], rel=1e-12)
    assert summary["updated_bf16_visible"] == totals["visible"]
    assert summary["distance_to_bf16_visibility"]["true_updates"] == pooled_hist.tolist()
    rows = list(csv.DictReader(open(tmp_path / "matrices.csv")))
    row = next(x for x in rows if x["tensor"] == "model.layers.0.mlp.up_proj.weight")
    w0, w1 = base[row["tensor"]], run[row["tensor"]]
    upd = (w1 != w0) if criterion.name == "exact" else (np.abs(w1 - w0) > tol)
    want = oracle(w0, w1, upd)
    assert int(row["updated_bf16_visible"]) == want["visible"]
    assert float(row["hidden_by_bf16"]) == pytest.approx(want["hidden"] / upd.sum(), rel=1e-12)


def test_bf16_visibility_in_the_sample_matches_the_bf16_run():
    """The bundled fp32 run is the bf16 run before its cast: its visible updates are the bf16 run's exact
    updates, position for position in count (an independent check of the definition)."""
    root = sample_dir()
    base32 = load_file(str(root / "base-fp32" / "model.safetensors"))
    run32 = load_file(str(root / "fp32-grpo-lowlr-seed1" / "model.safetensors"))
    a = Analysis(str(root / "base-fp32"), [str(root / "fp32-grpo-lowlr-seed1")],
                 AnalysisOptions(criterion=Criterion("exact"), rank=False, use_cache=False))
    result = a.run_all()
    a.close()
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        changed_bf16 = int((bf16_round(run32[name]) != bf16_round(base32[name])).sum())
        assert result.tensors[name].runs[0].updated_bf16_visible == changed_bf16


def test_fp32_weights_off_the_bf16_grid(tmp_path):
    """fp32 master weights that are not bf16 values: visibility depends on where w0 lies between bf16 values."""
    g = np.random.default_rng(3)
    w0 = (g.standard_normal((64, 96)) * 0.02).astype(np.float32)
    w0[0, :5] = 0.0
    scale = ulp_bf16(w0) * 2.0 ** g.uniform(-12, 4, size=w0.shape)
    w1 = (w0 + np.sign(g.standard_normal(w0.shape)) * scale * (g.random(w0.shape) < 0.7)).astype(np.float32)
    base = {"model.layers.0.mlp.up_proj.weight": torch.from_numpy(w0)}
    run = {"model.layers.0.mlp.up_proj.weight": torch.from_numpy(w1)}
    save(base, tmp_path / "base")
    save(run, tmp_path / "run")
    a = Analysis(str(tmp_path / "base"), [str(tmp_path / "run")],
                 AnalysisOptions(criterion=Criterion("exact"), rank=False, use_cache=False))
    s = a.run_all().tensors["model.layers.0.mlp.up_proj.weight"].runs[0]
    a.close()
    want = oracle(w0, w1, w1 != w0)
    assert (s.updated_bf16_visible, s.hidden_by_bf16) == (want["visible"], want["hidden"])
    assert s.ulp_histogram == want["hist"]
    hidden = (w1 != w0) & (bf16_round(w0) == bf16_round(w1))
    assert hidden.any() and (bf16_round(w0) != bf16_round(w1)).any()  # both kinds present


def test_bf16_pair_histogram_in_ulps():
    """A bf16 pair: no visibility figures, and the histogram of |Δ| in ULPs of w0 over the updated positions."""
    g = np.random.default_rng(5)
    w0 = torch.from_numpy((g.standard_normal(5000) * 0.05).astype(np.float32)).to(torch.bfloat16)
    steps = torch.from_numpy((g.standard_normal(5000) * 2e-3).astype(np.float32))
    w1 = (w0.float() + steps).to(torch.bfloat16)
    comp = compute_tensor(w0, [w1], Criterion("atol", 1e-5), want_rank=False)
    s = comp.runs[0]
    a = w0.float().numpy()
    d_bf16 = (w1 - w0).float().numpy()  # Δ in the stored dtype, as the criterion uses it
    updated = np.abs(d_bf16) > np.float32(torch.tensor(1e-5, dtype=torch.bfloat16).item())
    ratio = np.abs(d_bf16[updated]).astype(np.float64) / ulp_bf16(a[updated])
    _, e = np.frexp(ratio)
    want = np.bincount(np.clip(e - 1, ULP_LOG2_MIN, ULP_LOG2_MAX) - ULP_LOG2_MIN, minlength=ULP_BINS)
    assert s.ulp_histogram == want.tolist() and sum(s.ulp_histogram) == s.updated
    assert s.updated_bf16_visible is None and s.hidden_by_bf16 is None


def test_fp8_pairs_get_no_precision_figures():
    acc = PrecisionAccumulator(torch.float8_e4m3fn)
    x = torch.zeros(4, dtype=torch.float32)
    acc.add(x, x, x, x > 0)
    assert acc.finish() is None


def test_chunks_add_up_like_one_pass(monkeypatch):
    """compute_tensor's chunks (made tiny here) give the same figures as one pass."""
    import rlsub_tui.compute.kernels as kernels

    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(37, 53, generator=g) * 0.02
    w1 = w0 + torch.randn(37, 53, generator=g) * 1e-4 * (torch.rand(37, 53, generator=g) < 0.5)
    whole = compute_tensor(w0, [w1], Criterion("exact"), want_rank=False).runs[0]
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 100)
    chunked = compute_tensor(w0, [w1], Criterion("exact"), want_rank=False).runs[0]
    assert (chunked.ulp_histogram, chunked.updated_bf16_visible, chunked.hidden_by_bf16) == (
        whole.ulp_histogram, whole.updated_bf16_visible, whole.hidden_by_bf16)
    want = oracle(w0.numpy(), w1.numpy(), (w1 != w0).numpy())
    assert whole.ulp_histogram == want["hist"] and whole.hidden_by_bf16 == want["hidden"]


async def test_explorer_precision_chart_and_export(tmp_path):
    """`p` draws the focused node's distance to visibility, one series per run; `x` exports it in fractions that
    match numpy's histogram of the bundled fp32 pair."""
    from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig

    root = sample_dir()
    app = ExplorerApp(ExplorerConfig(str(root / "base-fp32"), [str(root / "fp32-grpo-lowlr-seed1")],
                                     AnalysisOptions(criterion=Criterion("exact"), rank=False, use_cache=False),
                                     tmp_path))
    async with app.run_test(size=(120, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        app._redraw_results()
        await pilot.press("p")
        await pilot.pause()
        data = app.current_chart()
        assert app.chart_name == "precision" and list(data.series) == ["fp32-grpo-lowlr-seed1"]
        await pilot.press("x")
        rows = list(csv.DictReader(open(app.last_export)))
    base = load_file(str(root / "base-fp32" / "model.safetensors"))
    run = load_file(str(root / "fp32-grpo-lowlr-seed1" / "model.safetensors"))
    hist = sum(np.asarray(oracle(base[n], run[n], run[n] != base[n])["hist"]) for n in base)
    used = np.flatnonzero(hist)
    want = hist[used[0]:used[-1] + 1] / hist.sum()
    assert [int(r["log2_r"]) for r in rows] == [ULP_LOG2_MIN + 1 + b for b in range(used[0], used[-1] + 1)]
    assert [float(r["fp32-grpo-lowlr-seed1"]) for r in rows] == pytest.approx(want.tolist())
    below = sum(float(r["fp32-grpo-lowlr-seed1"]) for r in rows if int(r["log2_r"]) < 0)
    assert 0 < below < 1  # r < 1: the share a bf16 cast may hide (the grid of w0 decides exactly which)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_updates_count_as_updated_but_have_no_distance(dtype):
    w0 = torch.tensor([0.5, 0.25, 1.0, 2.0], dtype=dtype).repeat(8)
    w1 = w0.clone()
    w1[0] = float("nan")
    w1[1] = 0.25 + 2 ** -6  # one bf16 ULP of 0.25 is 2^-9: |Δ| = 8 ULP, x = 3
    s = compute_tensor(w0, [w1], Criterion("exact"), want_rank=False).runs[0]
    assert s.updated == 2 and s.nonfinite == 1
    assert sum(s.ulp_histogram) == 1 and s.ulp_histogram[3 - ULP_LOG2_MIN] == 1
    if dtype == torch.float32:
        assert (s.updated_bf16_visible, s.hidden_by_bf16) == (2, 0)  # NaN differs from any value


@pytest.mark.cpu_route
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("criterion", [Criterion("atol", 1e-5), Criterion("exact")])
@pytest.mark.parametrize("route", ["all", "changed"])
def test_bf16_pairs_on_the_pattern_path_against_numpy(k, criterion, route, monkeypatch):
    """Tensors large enough for the 16-bit pattern path (a joint histogram of Δ's and w0's exponents): the
    distance histogram of every run, with zeros, tiny weights and a NaN planted, and rows/columns, vs numpy."""
    from rlsub_tui.compute import accumulate
    from rlsub_tui.compute.accumulate import PATTERN_MIN_NUMEL

    taken = []
    real = accumulate.PrecisionAndLines._add_bf16_patterns
    monkeypatch.setattr(accumulate.PrecisionAndLines, "_add_bf16_patterns",
                        lambda self, j, chunk, pattern: (taken.append(j), real(self, j, chunk, pattern)))

    g = np.random.default_rng(11 + k)
    m, n = 300, 257  # rows cut across chunks; numel above PATTERN_MIN_NUMEL
    assert m * n >= PATTERN_MIN_NUMEL
    a = (g.standard_normal((m, n)) * 0.05).astype(np.float32)
    a[0, :40] = 0.0
    a[1, :40] = 1e-39  # subnormal in float32, flushed or kept by bf16 as it stores it
    w0 = torch.from_numpy(a).to(torch.bfloat16)
    runs = []
    for j in range(k):
        step = (g.standard_normal((m, n)) * 3e-3 * (g.random((m, n)) < 0.4)).astype(np.float32)
        step[5 + j, :] = 0.0  # a row this run leaves alone
        runs.append((w0.float() + torch.from_numpy(step)).to(torch.bfloat16))
    runs[0][7, 3] = float("nan")
    skipped = force_route(monkeypatch, route)
    comp = compute_tensor(w0, runs, criterion, want_rank=False)
    check_route(skipped, route, True)
    assert sorted(set(taken)) == list(range(k))  # every run went through the pattern path
    base = w0.float().numpy()
    tol = np.float32(torch.tensor(1e-5, dtype=torch.bfloat16).item()) if criterion.name == "atol" else 0.0
    for j, run in enumerate(runs):
        d = (run - w0).float().numpy()  # Δ in the stored dtype
        finite = np.isfinite(d)
        updated = ~finite | (np.abs(np.where(finite, d, 0)) > tol)
        counted = updated & finite
        ratio = np.abs(d[counted]).astype(np.float64) / ulp_bf16(base[counted])
        _, e = np.frexp(ratio)
        want = np.bincount(np.clip(e - 1, ULP_LOG2_MIN, ULP_LOG2_MAX) - ULP_LOG2_MIN, minlength=ULP_BINS)
        s = comp.runs[j]
        assert s.updated == int(updated.sum())
        assert s.ulp_histogram == want.tolist()
        assert (s.rows_updated, s.cols_updated) == (int(updated.any(axis=1).sum()), int(updated.any(axis=0).sum()))


def test_bf16_values_differ_as_torch_compares_values():
    """Every pair of a set of bf16 values with ±0, ±Inf, NaNs of several payloads, subnormals and neighbours:
    the bit-pattern comparison equals torch's value comparison."""
    from rlsub_tui.compute.precision import bf16_values_differ

    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 1.0, -1.0, 1.0078125, 3e38],
                           dtype=torch.bfloat16)
    nans = torch.tensor([0x7FC0, 0x7F81, -1, -0x7F], dtype=torch.int16).view(torch.bfloat16)
    values = torch.cat([special, nans])
    a, b = torch.meshgrid(values, values, indexing="ij")
    assert np.array_equal(bf16_values_differ(a, b), (a != b).reshape(-1).numpy())


@pytest.mark.cpu_route
@pytest.mark.parametrize("subnormal", [False, True])
def test_fp32_distance_from_exponent_bits_or_frexp(subnormal, monkeypatch):
    """An fp32 pair counted from |Δ|'s exponent bits (normal Δ) or, for a chunk holding a subnormal true update,
    through frexp: both give numpy's histogram."""
    from rlsub_tui.compute import precision

    paths = []
    real = precision.PrecisionAccumulator._add_keys
    monkeypatch.setattr(precision.PrecisionAccumulator, "_add_keys",
                        lambda self, *a: paths.append(real(self, *a)) or paths[-1])
    g = np.random.default_rng(5)
    w0 = (g.standard_normal((50, 70)) * 0.02).astype(np.float32)
    w1 = (w0 + g.standard_normal(w0.shape).astype(np.float32) * 1e-4 * (g.random(w0.shape) < 0.5)).astype(np.float32)
    if subnormal:
        w0[3, 4], w1[3, 4] = 0.0, 3e-42  # Δ below float32's smallest normal
    comp = compute_tensor(torch.from_numpy(w0), [torch.from_numpy(w1)], Criterion("exact"), want_rank=False)
    s = comp.runs[0]
    want = oracle(w0, w1, w1 != w0)
    assert s.ulp_histogram == want["hist"] and (s.updated_bf16_visible, s.hidden_by_bf16) == (want["visible"], want["hidden"])
    assert paths == [not subnormal]


# --- true updates in the stored precision, whatever the comparison dtype -----------------------------------------

@pytest.mark.parametrize("policy", ["stored", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("criterion", [Criterion("exact"), Criterion("atol", 1e-5)])
def test_fp32_run_against_bf16_base_counts_its_true_updates_under_every_comparison(policy, criterion):
    """The bundled fp32 run against the bf16 base: under every --compare-dtype, each tensor's true updates (in
    fp32, the base cast up exactly), bf16-visible and hidden counts are numpy's, and the whole model's true
    sparsity and hidden share are the pooled numpy figures; the compared `updated` stays the pair dtype's."""
    root = sample_dir()
    from safetensors.torch import load_file as load_torch

    patterns = {n: t.view(torch.int16).numpy().view(np.uint16)  # bf16 bit patterns, widened by numpy below
                for n, t in load_torch(str(root / "base" / "model.safetensors")).items()}
    run = load_file(str(root / "fp32-grpo-lowlr-seed1" / "model.safetensors"))
    a = Analysis(str(root / "base"), [str(root / "fp32-grpo-lowlr-seed1")],
                 AnalysisOptions(criterion=criterion, rank=False, use_cache=False, compare_dtype=policy))
    result = a.run_all()
    a.close()
    tol = np.float32(criterion.value)
    true_total = numel_total = hidden_total = 0
    for name, w1 in run.items():
        w0 = (patterns[name].astype(np.uint32) << 16).view(np.float32)  # a bf16 value is its float32's top half
        if criterion.name == "exact":
            true = w1 != w0
        else:
            true = np.abs(w1 - w0) > tol  # the float32 difference, as a comparison in fp32 takes it
        visible = bf16_round(w0) != bf16_round(w1)
        s = result.tensors[name].runs[0]
        assert s.true_updated == int(true.sum()), name
        assert s.updated_bf16_visible == int(visible.sum()), name
        assert s.hidden_by_bf16 == int((true & ~visible).sum()), name
        true_total, numel_total = true_total + int(true.sum()), numel_total + true.size
        hidden_total += int((true & ~visible).sum())
    stats = result.stats()
    assert stats.true_sparsity(0) == pytest.approx(1 - true_total / numel_total)
    assert stats.hidden_by_bf16(0) == pytest.approx(hidden_total / true_total)
    if policy in ("stored", "bf16"):  # compared in bf16: the headline counts far fewer updates than stored
        assert stats.sparsity(0) > stats.true_sparsity(0) + 0.05
