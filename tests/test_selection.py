"""Pooled figures over a chosen subset of runs, from the per-tensor records, against numpy on the masks."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.records.criteria import Criterion
from rlsub_tui.records.results import Stats
from rlsub_tui.summaries.selection import SelectedStats, parse_runs, subset_agreement
from rlsub_tui.util.errors import InputError


def _records(k: int, seed: int):
    """Two float32 tensors, K runs updating random positions (exact criterion); the masks for numpy."""
    rng = np.random.default_rng(seed)
    records, masks = [], []
    for t, shape in enumerate([(40, 30), (500,)]):
        base = rng.standard_normal(shape).astype(np.float32)
        dens = rng.uniform(0.05, 0.6, size=k)
        common = rng.random(shape) < 0.3
        m = [np.where(rng.random(shape) < 0.5, common, rng.random(shape) < dens[j]) for j in range(k)]
        runs = [torch.from_numpy(base + mj * rng.choice([-1.0, 1.0], shape).astype(np.float32)) for mj in m]
        comp = compute_tensor(torch.from_numpy(base), runs, Criterion("exact", 0.0), want_rank=False)
        records.append(replace(comp, name=f"t{t}", dtype="F32"))
        masks.append(np.stack([mj.reshape(-1) for mj in m]))
    return records, np.concatenate(masks, axis=1)


@pytest.mark.parametrize("runs", [(0, 1), (0, 2, 3), (1, 2, 3), (0, 1, 2, 3, 4)])
def test_subset_figures_match_numpy(runs):
    k = 5
    records, masks = _records(k, seed=len(runs))
    sel = SelectedStats(Stats.of(records, k), runs)
    n = masks.shape[1]
    m = masks[list(runs)]
    hits = m.sum(axis=0)
    assert sel.agreement().tolist() == np.bincount(hits, minlength=len(runs) + 1).tolist()
    assert sel.consensus().observed == pytest.approx(np.mean(hits == len(runs)))
    assert sel.consensus().chance == pytest.approx(np.prod(m.mean(axis=1)))
    o1s, chance1, jacs, chancej = [], [], [], []
    for a, b in itertools.permutations(range(len(runs)), 2):
        o1s.append((m[a] & m[b]).sum() / m[a].sum())
        chance1.append(m[b].sum() / n)
    for a, b in itertools.combinations(range(len(runs)), 2):
        jacs.append((m[a] & m[b]).sum() / (m[a] | m[b]).sum())
        p, q = m[a].mean(), m[b].mean()
        chancej.append(p * q / (p + q - p * q))
    assert sel.one_sided().observed == pytest.approx(np.mean(o1s))
    assert sel.one_sided().chance == pytest.approx(np.mean(chance1))
    assert sel.one_sided().lift == pytest.approx(np.mean(o1s) / np.mean(chance1))
    assert sel.jaccard().observed == pytest.approx(np.mean(jacs))
    assert sel.jaccard().chance == pytest.approx(np.mean(chancej))
    assert [a for a, _, _ in sel.pairs()] == [runs[a] for a, _ in itertools.combinations(range(len(runs)), 2)]


def test_sign_agreement_only_for_all_runs():
    records, _ = _records(3, seed=9)
    stats = Stats.of(records, 3)
    assert SelectedStats(stats, (0, 1, 2)).sign_agreement() == stats.sign_agreement()
    assert math.isnan(SelectedStats(stats, (0, 1)).sign_agreement())


def test_no_update_gives_undefined_overlap_not_zero():
    base = torch.zeros(10)
    comp = compute_tensor(base, [base.clone(), base.clone()], Criterion("exact", 0.0), want_rank=False)
    sel = SelectedStats(Stats.of([replace(comp, name="z", dtype="F32")], 2), (0, 1))
    assert math.isnan(sel.one_sided().observed) and math.isnan(sel.jaccard().observed)


def test_subset_agreement_hand_case():
    # 3 runs; codes: 0b000 x4, 0b011 x2, 0b111 x1, 0b100 x3
    codes = np.zeros(8, dtype=np.int64)
    codes[0], codes[3], codes[7], codes[4] = 4, 2, 1, 3
    assert subset_agreement(codes, (0, 1)).tolist() == [7, 0, 3]
    assert subset_agreement(codes, (0, 2)).tolist() == [4, 5, 1]


def test_parse_runs():
    labels = ["lowlr-seed1", "lowlr-seed2", "hilr-seed1", "sft"]
    assert parse_runs("lowlr-*", labels) == (0, 1)
    assert parse_runs("1,3", labels) == (0, 2)
    assert parse_runs("2-4", labels) == (1, 2, 3)
    assert parse_runs("sft, 1", labels) == (0, 3)
    with pytest.raises(InputError, match="matches no run; the runs are lowlr-seed1"):
        parse_runs("nope*", labels)
    with pytest.raises(InputError, match="from 1 to 4"):
        parse_runs("5", labels)


def test_beyond_max_subset_runs_only_all_runs_have_consensus():
    from rlsub_tui.records.criteria import MAX_SUBSET_RUNS

    k = MAX_SUBSET_RUNS + 1
    records, masks = _records(k, seed=4)
    assert all(r.run_codes == [] for r in records)  # the records stay small
    stats = Stats.of(records, k)
    everyone = SelectedStats(stats, tuple(range(k)))
    assert everyone.consensus().observed == pytest.approx(np.mean(masks.all(axis=0)))
    subset = SelectedStats(stats, (0, 1, 2))
    assert subset.agreement() is None and math.isnan(subset.consensus().observed)
    assert subset.one_sided().observed == pytest.approx(
        np.mean([(masks[a] & masks[b]).sum() / masks[a].sum() for a, b in itertools.permutations(range(3), 2)]))
