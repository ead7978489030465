"""A run's figures depend on its own pair alone: the comparison dtype per pair, cache keys, any K, NaN/Inf."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from synthetic import base_state, save, sparse_run

from rlsub_tui.checkpoints.sample_paths import sample_dir
from rlsub_tui.cli.main import main
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.compute.kernels import MAX_RUNS
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.records.criteria import AnalysisOptions, Criterion

SAMPLE = sample_dir()


def analyze(base, runs, **kw):
    kw.setdefault("use_cache", False)
    a = Analysis(str(base), [str(r) for r in runs], AnalysisOptions(**kw))
    a.run_all()
    a.close()
    return a.result


def run_records(result, label):
    """Every per-tensor figure of one run, as plain data."""
    i = result.run_labels.index(label)
    return {n: dataclasses.asdict(r.runs[i]) for n, r in result.tensors.items()}


def sample_run(name):
    """NAME=PATH of a sample run's final checkpoint (the grpo-lowlr seeds are timelines: their last step)."""
    from rlsub_tui.checkpoints.step_folders import find_timeline
    timeline = find_timeline(str(SAMPLE / name))
    return f"{name}={timeline.checkpoints[-1] if timeline else SAMPLE / name}"


def sample_state(name):
    from safetensors.torch import load_file
    return load_file(str(Path(sample_run(name).split("=", 1)[1]) / "model.safetensors"))


# --- item 2: the comparison dtype is chosen per pair ---------------------------------------------------

def test_fp32_run_has_the_same_figures_alone_and_in_any_company():
    fp32 = f"{SAMPLE}/fp32-grpo-lowlr-seed1"
    alone = analyze(SAMPLE / "base-fp32", [fp32], sweep=(1e-7, 1e-5))
    mixed = analyze(SAMPLE / "base-fp32", [sample_run("grpo-lowlr-seed2"), fp32, sample_run("grpo-lowlr-seed1")],
                    sweep=(1e-7, 1e-5))
    label = "fp32-grpo-lowlr-seed1"
    assert run_records(alone, label) == run_records(mixed, label)
    assert alone.stats().sparsity(0) == mixed.stats().sparsity(1)
    # the bf16 runs in the same analysis are compared in bf16, the fp32 one in fp32
    assert {s.dtype for r in mixed.tensors.values() for s in r.runs[::2]} == {"bf16"}
    assert {s.dtype for r in mixed.tensors.values() for s in (r.runs[1],)} == {"fp32"}
    # and the bf16 runs equally keep their figures when the fp32 run joins
    pair = analyze(SAMPLE / "base-fp32", [sample_run("grpo-lowlr-seed2")], sweep=(1e-7, 1e-5))
    assert run_records(pair, "grpo-lowlr-seed2") == run_records(mixed, "grpo-lowlr-seed2")


def test_pairwise_counts_match_numpy_and_overlaps_combine_per_run_masks():
    base, fp32, bf16 = sample_state("base-fp32"), sample_state("fp32-grpo-lowlr-seed1"), sample_state("grpo-lowlr-seed2")
    result = analyze(SAMPLE / "base-fp32", [f"{SAMPLE}/fp32-grpo-lowlr-seed1", sample_run("grpo-lowlr-seed2")],
                     rank=False)
    names = list(result.tensors)
    m32 = [reference.mask(base[n].float().numpy(), fp32[n].float().numpy(), "fp32") for n in names]
    b16 = {n: reference.round_bf16(base[n].float().numpy()) for n in names}
    m16 = [reference.mask(b16[n], bf16[n].float().numpy(), "bf16") for n in names]
    d32 = [reference.stored_delta(base[n].float().numpy(), fp32[n].float().numpy(), "fp32") for n in names]
    d16 = [reference.stored_delta(b16[n], bf16[n].float().numpy(), "bf16") for n in names]
    exp = reference.pooled([m32, m16], [d32, d16])
    s = result.stats()
    assert [int(u) for u in s.updated] == exp["updated"]
    assert s.pair(0, 1)["both"] == exp["pairs"][(0, 1)]["both"]
    assert [int(x) for x in s.agreement] == exp["agreement"]
    assert (s.multi, s.sign_agree) == (exp["multi"], exp["sign_agree"])
    # the numbers: 1.2% alone was 8.8% in bf16 company; the pairwise rule keeps 1.2%
    assert round(100 * s.sparsity(0), 1) == 1.2


def test_compare_dtype_bf16_reproduces_the_papers_script_on_fp32_checkpoints():
    base, run = sample_state("base-fp32"), sample_state("fp32-grpo-lowlr-seed1")
    result = analyze(SAMPLE / "base-fp32", [f"{SAMPLE}/fp32-grpo-lowlr-seed1"], compare_dtype="bf16")
    for name, r in result.tensors.items():
        b16, r16 = base[name].to(torch.bfloat16), run[name].to(torch.bfloat16)  # the script loads in bf16
        delta = r16 - b16
        want = int((~torch.isclose(delta, torch.zeros_like(delta), rtol=1e-5, atol=1e-5)).sum())
        assert r.runs[0].updated == want, name
        assert r.dtype == "bf16" and r.runs[0].dtype == "bf16"
        if delta.ndim == 2:
            assert r.runs[0].rank == int(torch.linalg.matrix_rank(delta.float())), name
    stored = analyze(SAMPLE / "base-fp32", [f"{SAMPLE}/fp32-grpo-lowlr-seed1"], rank=False)
    assert result.stats().sparsity(0) > stored.stats().sparsity(0) + 0.05  # bf16 hides most fp32 updates
    assert [n for n in result.notes if "compared in bf16" in n] == [
        "run 'fp32-grpo-lowlr-seed1': 39 tensors fp32 vs base fp32 compared in bf16 (--compare-dtype bf16)."]


def test_cast_runs_are_named_once_each_on_stderr(tmp_path, capsys):
    code = main(["analyze", f"{SAMPLE}/base-fp32", f"{SAMPLE}/fp32-grpo-lowlr-seed1", sample_run("grpo-lowlr-seed2"),
                 "--out", str(tmp_path / "out"), "--quiet", "--no-rank"])
    err = capsys.readouterr().err.splitlines()
    assert code == 0
    cast = [line for line in err if "compared in" in line]
    assert cast == ["rlsub-tui: note: run 'grpo-lowlr-seed2': 39 tensors bf16 vs base fp32 compared in bf16 "
                    "(the less precise of the pair)."]
    assert not any("fp32-grpo-lowlr-seed1" in line for line in err)


def test_compare_dtype_is_checked():
    from rlsub_tui.util.errors import InputError
    with pytest.raises(InputError, match="compare-dtype"):
        AnalysisOptions(compare_dtype="fp8")
    with pytest.raises(SystemExit) as exc:  # argparse's own one-line error, exit status 2
        main(["analyze", f"{SAMPLE}/base", sample_run("grpo-lowlr-seed1"), "--out", "/nonexistent/x",
              "--compare-dtype", "int8"])
    assert exc.value.code == 2


# --- item 3: every cached figure keyed by everything it depends on ---------------------------------------

def _results(result):
    return {n: r.to_dict() for n, r in result.tensors.items()}


def test_each_input_change_gives_the_no_cache_answer(tmp_path):
    b = base_state(dtype=torch.float32)
    runs = [sparse_run(b, s, scale=3e-5) for s in range(3)]
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    save(b, tmp_path / "base")
    grown = dict(runs[0])
    grown["model.embed_tokens.weight"] = torch.cat([runs[0]["model.embed_tokens.weight"],
                                                    torch.zeros(2, 32)])  # a resized vocabulary
    save(grown, tmp_path / "grown")
    save({n: t.to(torch.bfloat16) for n, t in runs[1].items()}, tmp_path / "run1-bf16")
    base, r0, r1, r2 = (str(tmp_path / n) for n in ("base", "run0", "run1", "run2"))
    cache = tmp_path / "cache"
    reference_case = ([r0, r1], {})
    variants = {
        "criterion": ([r0, r1], dict(criterion=Criterion("exact", 0.0))),
        "tolerance": ([r0, r1], dict(criterion=Criterion("atol", 1e-6))),
        "eta": ([r0, r1], dict(criterion=Criterion("relative", 1e-4))),
        "sweep": ([r0, r1], dict(sweep=(1e-7,))),
        "compare dtype": ([r0, r1], dict(compare_dtype="bf16")),
        "rank off": ([r0, r1], dict(rank=False)),
        "company": ([r0, r1, r2], {}),
        "one run": ([r1], {}),
        "a run's dtype": ([r0, str(tmp_path / "run1-bf16")], {}),
        "common rows": ([str(tmp_path / "grown"), r1], dict(common_rows=True)),
    }

    def cached(runs_, opts):
        return analyze(base, runs_, use_cache=True, cache_dir=cache, **opts)

    first = cached(*reference_case)
    for what, (runs_, opts) in variants.items():
        cached(*reference_case)
        got = cached(runs_, opts)
        fresh = analyze(base, runs_, **opts)
        assert _results(got) == _results(fresh), what
        assert _results(fresh) != _results(first), f"{what}: the variant changes no figure"
    # a changed checkpoint (same size, new bytes) is recomputed too
    import time
    time.sleep(0.01)
    save(runs[2], tmp_path / "run1")
    got, fresh = cached(*reference_case), analyze(base, [r0, r1])
    assert _results(got) == _results(fresh) != _results(first)


def test_rank_cache_after_a_bf16_analysis_gives_the_fp32_rank():
    cache_opts = dict(use_cache=True, cache_dir=None)
    fp32 = f"{SAMPLE}/fp32-grpo-lowlr-seed1"
    as_bf16 = analyze(SAMPLE / "base-fp32", [fp32], compare_dtype="bf16", **cache_opts)
    cached = analyze(SAMPLE / "base-fp32", [fp32], **cache_opts)
    fresh = analyze(SAMPLE / "base-fp32", [fp32])
    ranks = lambda r: {n: t.runs[0].rank for n, t in r.tensors.items()}  # noqa: E731
    assert ranks(cached) == ranks(fresh)
    assert ranks(as_bf16) != ranks(fresh)  # the dtype does change some rank here


# --- item 4: any K ---------------------------------------------------------------------------------------

def _many_runs(k, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
    runs = []
    always = torch.arange(n) < n // 4  # updated by every run, so the all-K bin is reached
    for _ in range(k):
        pick = (torch.rand(n, generator=g) < 0.6) | always
        step = torch.randn(n, generator=g).sign() * 1e-2
        runs.append((base.float() + pick * step).to(torch.bfloat16))
    return base, runs


@pytest.mark.parametrize("k", [64, MAX_RUNS])
def test_k_runs_equal_pairwise_numpy(k):
    base, runs = _many_runs(k)
    comp = compute_tensor(base, runs, Criterion(), want_rank=False)
    b = base.float().numpy()
    masks = [reference.mask(b, r.float().numpy(), "bf16") for r in runs]
    deltas = [reference.stored_delta(b, r.float().numpy(), "bf16") for r in runs]
    exp = reference.pooled([[m] for m in masks], [[d] for d in deltas])
    assert [s.updated for s in comp.runs] == exp["updated"]
    assert comp.agreement == exp["agreement"] and comp.agreement[k] > 0  # the all-K bin is reached
    assert comp.multi == exp["multi"] and comp.sign_agree == exp["sign_agree"]
    for (a, c), n in comp.both.items():
        assert n == exp["pairs"][(a, c)]["both"]


def test_64_runs_through_the_engine_and_more_than_the_maximum_refused(tmp_path, capsys):
    k = 64
    base, runs = _many_runs(k, n=48, seed=1)
    save({"w": base.reshape(6, 8)}, tmp_path / "base")
    for i, r in enumerate(runs):
        save({"w": r.reshape(6, 8)}, tmp_path / f"r{i}")
    paths = [tmp_path / f"r{i}" for i in range(k)]
    result = analyze(tmp_path / "base", paths, rank=False)
    b = base.float().numpy()
    exp = reference.pooled([[reference.mask(b, r.float().numpy(), "bf16")] for r in runs],
                           [[reference.stored_delta(b, r.float().numpy(), "bf16")] for r in runs])
    s = result.stats()
    assert [int(x) for x in s.agreement] == exp["agreement"]
    assert all(s.pair(a, c)["both"] == p["both"] for (a, c), p in exp["pairs"].items())
    too_many = [str(paths[i % k]) for i in range(MAX_RUNS + 1)]
    code = main(["analyze", str(tmp_path / "base"), *too_many, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "out").exists()
    assert err == [f"rlsub-tui: error: {MAX_RUNS + 1} runs given; at most {MAX_RUNS} can be compared "
                   "in one analysis."]


# --- item 5: one rule for NaN/Inf --------------------------------------------------------------------------

def test_nonfinite_rule_for_norms_and_sign_agreement():
    """Where Δ is NaN/Inf for a run: updated by it, left out of its |Δ|, ‖Δ‖, ‖W0‖ and of sign agreement."""
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 5.0])
    r0 = torch.tensor([1.5, 2.5, float("inf"), 4.5, 0.0, 5.0])
    r1 = torch.tensor([1.5, 1.5, 3.5, float("nan"), 0.0, 5.0])
    comp = compute_tensor(base, [r0, r1], Criterion(), want_rank=False)
    s0, s1 = comp.runs
    assert (s0.updated, s0.nonfinite, s1.updated, s1.nonfinite) == (5, 2, 5, 2)
    assert s0.sq_base == 1 + 4 + 16 + 25 and s1.sq_base == 1 + 4 + 9 + 25  # w0² only where Δ is finite
    assert s0.sq_delta == 3 * 0.25 and s0.sum_abs_delta == 1.5
    assert comp.agreement == [1, 0, 5]
    # updated by both: positions 0 (+,+ agree), 1 (+,- disagree); 2, 3 and 4 have a NaN/Inf Δ: left out
    assert (comp.multi, comp.sign_agree) == (2, 1)
    assert math.isclose(math.sqrt(s0.sq_delta / s0.sq_base), math.sqrt(0.75 / 46))


def test_nonfinite_rule_matches_numpy_on_random_data():
    g = np.random.default_rng(3)
    base = g.normal(size=500).astype(np.float32)
    runs = []
    for _ in range(3):
        r = base + (g.random(500) < 0.5) * g.normal(size=500).astype(np.float32) * 1e-2
        r[g.integers(0, 500, 20)] = g.choice([np.nan, np.inf, -np.inf], 20)
        runs.append(r.astype(np.float32))
    base[g.integers(0, 500, 5)] = np.nan
    comp = compute_tensor(torch.from_numpy(base), [torch.from_numpy(r) for r in runs], Criterion(), want_rank=False)
    with np.errstate(invalid="ignore"):
        deltas = [r - base for r in runs]
        finite = [np.isfinite(d) for d in deltas]
        masks = [~(np.abs(d) <= np.float32(1e-5)) for d in deltas]
    for s, d, f in zip(comp.runs, deltas, finite):
        assert s.nonfinite == int((~f).sum())
        assert s.sq_base == pytest.approx(float((base[f].astype(np.float64) ** 2).sum()), rel=1e-6)
        assert s.sq_delta == pytest.approx(float((d[f].astype(np.float64) ** 2).sum()), rel=1e-6)
    count = np.sum(masks, axis=0)
    signed = np.all(finite, axis=0)
    several = (count >= 2) & signed
    pos = np.sum([m & (d > 0) for m, d in zip(masks, deltas)], axis=0)
    neg = np.sum([m & (d < 0) for m, d in zip(masks, deltas)], axis=0)
    assert comp.multi == int(several.sum())
    assert comp.sign_agree == int((several & ((pos == count) | (neg == count))).sum())
    assert comp.agreement == [int((count == j).sum()) for j in range(4)]


def test_forced_dtype_shows_in_the_summary(tmp_path, capsys):
    assert main(["analyze", f"{SAMPLE}/base-fp32", f"{SAMPLE}/fp32-grpo-lowlr-seed1", "--compare-dtype", "bf16",
                 "--out", str(tmp_path / "out"), "--quiet", "--no-rank", "--no-cache"]) == 0
    assert "every pair compared in bf16" in "\n".join(capsys.readouterr().out.splitlines()[:3])
    import json
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["compare_dtype"] == "bf16"
    rows = (tmp_path / "out" / "matrices.csv").read_text().splitlines()
    assert rows[0].split(",")[2] == "dtype" and {r.split(",")[2] for r in rows[1:]} == {"bf16"}


def test_gram_pair_intersections_equal_numpy():
    from rlsub_tui.compute.kernels import PAIR_BLOCK, pair_intersections
    g = np.random.default_rng(5)
    n = PAIR_BLOCK * 2 + 17  # several blocks and a ragged end
    masks = [g.random(n) < p for p in (0.0, 0.3, 0.9, 1.0, 0.5)]
    got = pair_intersections([torch.from_numpy(m) for m in masks])
    want = np.array([[int((a & c).sum()) for c in masks] for a in masks])
    assert (got == want).all() and got.dtype == np.int64
