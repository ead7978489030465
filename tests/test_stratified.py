"""The stratified chance level (tensor x |w0| exponent) against a brute-force numpy computation."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import save

from rlsub_tui.compute.engine import Analysis
from rlsub_tui.export.outputs import write_outputs
from rlsub_tui.records import overlap
from rlsub_tui.records.criteria import AnalysisOptions

SHAPES = {"model.layers.0.mlp.up_proj.weight": (96, 64), "model.layers.0.self_attn.q_proj.weight": (64, 64),
          "model.layers.0.input_layernorm.weight": (64,), "lm_head.weight": (80, 64)}
TENSOR_RATE = {"model.layers.0.mlp.up_proj.weight": 1.0, "model.layers.0.self_attn.q_proj.weight": 0.4,
               "model.layers.0.input_layernorm.weight": 0.05, "lm_head.weight": 0.7}


def planted(k: int = 3, seed: int = 0):
    """A bf16 base with |w0| spread over 2^-14..2^0 (and some zeros), and k runs that update independently
    with a probability that falls with |w0| and differs by tensor: the structure a pooled null ignores."""
    g = np.random.default_rng(seed)
    base, runs = {}, [{} for _ in range(k)]
    for name, shape in SHAPES.items():
        exponent = g.uniform(-14, 0, size=shape)
        w0 = np.sign(g.standard_normal(shape)) * 2.0 ** exponent
        w0[g.random(shape) < 0.05] = 0.0
        w0 = torch.from_numpy(w0.astype(np.float32)).to(torch.bfloat16)
        base[name] = w0
        p = np.clip(0.9 - 0.06 * (exponent + 14), 0.02, 0.9) * TENSOR_RATE[name]
        step = np.maximum(0.25 * np.abs(w0.float().numpy()), 1e-3)
        for r in range(k):
            moved = g.random(shape) < p
            runs[r][name] = (w0.float() + torch.from_numpy((moved * step).astype(np.float32))).to(torch.bfloat16)
    return base, runs


def numpy_masks(base, runs):
    names = list(base)
    bases = [base[n].float().numpy() for n in names]
    masks = [[reference.mask(base[n].float().numpy(), r[n].float().numpy(), "bf16") for n in names] for r in runs]
    return names, bases, masks


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strat")
    base, runs = planted()
    bp = save(base, tmp / "base")
    rps = [save(r, tmp / f"run{i}") for i, r in enumerate(runs)]
    a = Analysis(str(bp), [str(p) for p in rps], AnalysisOptions(rank=False, use_cache=False))
    a.run_all()
    a.close()
    return a.result, base, runs, tmp


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_formulas_against_enumeration(k, strata, seed):
    g = np.random.default_rng(seed)
    numel = g.integers(0, 50, size=strata)
    updated = np.stack([[g.integers(0, n + 1) for n in numel] for _ in range(k)])
    e = overlap.expected_intersections(updated, numel)
    chance = overlap.agreement_chance_strat(updated, numel)
    brute = np.zeros(k + 1)
    for s, n in enumerate(numel):
        if n == 0:
            continue
        p = updated[:, s] / n
        for subset in itertools.product([0, 1], repeat=k):
            brute[sum(subset)] += n * np.prod([p[r] if bit else 1 - p[r] for r, bit in enumerate(subset)])
    assert chance == pytest.approx(brute, abs=1e-9)
    assert chance.sum() == pytest.approx(numel.sum())
    for a in range(k):
        for b in range(k):
            want = sum(updated[a, s] * updated[b, s] / n for s, n in enumerate(numel) if n)
            assert e[a, b] == pytest.approx(want, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10_000), st.integers(0, 10_000), st.integers(0, 10_000))
def test_one_stratum_is_the_pooled_null(n, ua, ub):
    ua, ub = ua % (n + 1), ub % (n + 1)
    e = overlap.expected_intersections(np.array([[ua], [ub]]), np.array([n]))[0, 1]
    r1, r2 = overlap.one_sided_chance(ua, ub, n)
    s1, s2 = overlap.one_sided_chance_strat(e, ua, ub)
    # the pooled o1 chance |B|/n exists even when A is empty; E/|A| (like o1 itself) is then undefined
    assert s1 == pytest.approx(r1) if ua else np.isnan(s1)
    assert s2 == pytest.approx(r2) if ub else np.isnan(s2)
    assert overlap.jaccard_chance_strat(e, ua, ub) == pytest.approx(overlap.jaccard_chance(ua, ub, n), nan_ok=True)
    d = [ua / n, ub / n]
    assert overlap.agreement_chance_strat(np.array([[ua], [ub]]), np.array([n])) == pytest.approx(
        overlap.agreement_chance(d) * n)


def test_expected_intersection_is_the_mean_of_random_draws():
    """Within each stratum, random sets of the stratum's sizes intersect on average in a_s·b_s/n_s."""
    g = np.random.default_rng(1)
    numel = np.array([40, 7, 100])
    updated = np.array([[30, 1, 5], [10, 6, 50]])
    draws = []
    for _ in range(4000):
        both = 0
        for s, n in enumerate(numel):
            a = g.choice(n, updated[0, s], replace=False)
            b = g.choice(n, updated[1, s], replace=False)
            both += np.intersect1d(a, b).size
        draws.append(both)
    assert np.mean(draws) == pytest.approx(overlap.expected_intersections(updated, numel)[0, 1], rel=0.02)


def test_engine_pooled_stratified_null_matches_numpy(analysed):
    result, base, runs, _ = analysed
    names, bases, masks = numpy_masks(base, runs)
    want = reference.stratified_null(bases, masks)
    s = result.stats()
    for (a, b), p in want["pairs"].items():
        got = s.pair(a, b)
        for key in ("o1_random_strat", "o2_random_strat", "jaccard_random_strat"):
            assert got[key] == pytest.approx(p[key], rel=1e-9), key
    assert s.agreement_chance_strat() == pytest.approx(want["agreement_chance_strat"], rel=1e-9)
    assert s.consensus_chance_strat() == pytest.approx(want["consensus_chance_strat"], rel=1e-9)


def test_planted_structure_beats_the_pooled_null_not_the_stratified(analysed):
    """Runs that are independent within each stratum overlap as the stratified null says, above the pooled one."""
    result, *_ = analysed
    s = result.stats()
    for a, b, p in s.pairs():
        assert p["o1_random"] < p["o1_random_strat"] - 0.05
        assert p["o1"] == pytest.approx(p["o1_random_strat"], abs=0.03)
        assert p["jaccard"] == pytest.approx(p["jaccard_random_strat"], abs=0.03)
    assert s.consensus() == pytest.approx(s.consensus_chance_strat(), abs=0.02)
    assert s.consensus_chance() < s.consensus_chance_strat()


def test_per_tensor_and_node_figures_sum_expected_intersections(analysed):
    result, base, runs, _ = analysed
    names, bases, masks = numpy_masks(base, runs)
    for t, name in enumerate(names):
        want = reference.stratified_null([bases[t]], [[m[t]] for m in masks])
        got = result.stats([name])
        for (a, b), p in want["pairs"].items():
            assert got.pair(a, b)["o1_random_strat"] == pytest.approx(p["o1_random_strat"], rel=1e-9, nan_ok=True)
        assert got.agreement_chance_strat() == pytest.approx(want["agreement_chance_strat"], rel=1e-9)
    # a node of two tensors: expected intersections add up; averaging the two tensors' ratios would not
    pair = names[:2]
    node = result.stats(pair)
    e = sum(result.stats([n]).expected_both[0, 1] for n in pair)
    ua = sum(int(result.tensors[n].runs[0].updated) for n in pair)
    assert node.pair(0, 1)["o1_random_strat"] == pytest.approx(e / ua, rel=1e-12)
    mean_of_ratios = np.mean([result.stats([n]).pair(0, 1)["o1_random_strat"] for n in pair])
    assert node.pair(0, 1)["o1_random_strat"] != pytest.approx(mean_of_ratios, rel=1e-3)


def test_outputs_carry_the_stratified_null(analysed):
    result, base, runs, tmp = analysed
    names, bases, masks = numpy_masks(base, runs)
    out = tmp / "out"
    write_outputs(result, out)
    with open(out / "pairs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(names) * 3
    for row in rows:
        t = names.index(row["tensor"])
        a, b = result.run_labels.index(row["run_a"]), result.run_labels.index(row["run_b"])
        want = reference.stratified_null([bases[t]], [[m[t]] for m in masks])["pairs"][(a, b)]
        for key in ("o1_random_strat", "o2_random_strat", "jaccard_random_strat"):
            assert float(row[key]) == pytest.approx(want[key], rel=1e-9), key
    with open(out / "agreement.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        t = names.index(row["tensor"])
        want = reference.stratified_null([bases[t]], [[m[t]] for m in masks])
        got = [float(row[f"chance_strat_{j}"]) for j in range(4)]
        assert got == pytest.approx(list(want["agreement_chance_strat"]), rel=1e-9, abs=1e-9)
        assert float(row["consensus_chance_strat"]) == pytest.approx(want["consensus_chance_strat"], rel=1e-9)
        pooled = overlap.agreement_chance([m[t].mean() for m in masks]) * bases[t].size
        assert [float(row[f"chance_{j}"]) for j in range(4)] == pytest.approx(list(pooled), rel=1e-9, abs=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    want = reference.stratified_null(bases, masks)
    assert summary["agreement_chance_strat"] == pytest.approx(list(want["agreement_chance_strat"]), rel=1e-9)
    assert summary["consensus_chance_strat"] == pytest.approx(want["consensus_chance_strat"], rel=1e-9)
    assert summary["pairs"][0]["o1_random_strat"] == pytest.approx(want["pairs"][(0, 1)]["o1_random_strat"])


def test_charts_and_summary_show_both_chance_levels(analysed):
    from rlsub_tui.cli.report import summary_text
    from rlsub_tui.summaries.charts import CHANCE_POOLED, CHANCE_STRAT, agreement_chart, overlap_chart
    from rlsub_tui.summaries.selection import SelectedStats
    from rlsub_tui.util.formatting import pct

    result, *_ = analysed
    s = result.stats()
    every = SelectedStats(s, tuple(range(result.k)))
    for metric, key in (("o1", "o1"), ("jaccard", "jaccard")):
        chart = overlap_chart(every, metric)
        pairs = list(s.pairs())
        assert chart.series[f"{key}_random"] == [p[f"{key}_random"] for _, _, p in pairs]
        assert chart.series[f"{key}_random_strat"] == [p[f"{key}_random_strat"] for _, _, p in pairs]
        assert chart.series[f"{key}_random_strat"] != chart.series[f"{key}_random"]
    chart = agreement_chart(every)
    assert chart.series[CHANCE_STRAT] == pytest.approx(list(100 * s.agreement_chance_strat() / s.numel))
    assert sum(chart.series[CHANCE_STRAT]) == pytest.approx(100)
    header, rows = chart.rows()
    assert header == ["j", "observed", CHANCE_POOLED, CHANCE_STRAT]
    text = summary_text(result)
    assert f"{pct(s.consensus_chance_strat())} stratified chance" in text
    assert "strat" in text.splitlines()[[i for i, line in enumerate(text.splitlines()) if "o1" in line][0]]
