"""The engine against an independent numpy computation, on synthetic checkpoints with known updates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference
import torch
from synthetic import LLAMA_SHAPES, base_state, save, sparse_run

from rlsub_tui.compute.engine import Analysis
from rlsub_tui.records.criteria import AnalysisOptions, Criterion

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def analyze(base, runs, **kw) -> Analysis:
    kw.setdefault("use_cache", False)
    a = Analysis(str(base), [str(r) for r in runs], AnalysisOptions(**kw))
    a.run_all()
    a.close()
    return a


def states(dtype=torch.bfloat16, k=3, **kw):
    b = base_state(dtype=dtype)
    return b, [sparse_run(b, s, **kw) for s in range(k)]


def expected(b, runs, dtype_name, criterion="atol", value=1e-5, names=None):
    names = names or list(b)
    masks = [[reference.mask(b[n].float().numpy(), r[n].float().numpy(), dtype_name, criterion, value)
              for n in names] for r in runs]
    deltas = [[reference.stored_delta(b[n].float().numpy(), r[n].float().numpy(), dtype_name) for n in names]
              for r in runs]
    return reference.pooled(masks, deltas)


def check_against(result, exp):
    s = result.stats()
    assert s.numel == exp["numel"]
    assert [int(u) for u in s.updated] == exp["updated"]
    for (a, b), p in exp["pairs"].items():
        got = s.pair(a, b)
        assert got["both"] == p["both"]
        for key in ("o1", "o2", "o1_random", "o2_random", "jaccard", "jaccard_random"):
            assert got[key] == pytest.approx(p[key], rel=1e-12), key
    assert [int(x) for x in s.agreement] == exp["agreement"]
    assert s.multi == exp["multi"]
    assert s.sign_agree == exp["sign_agree"]


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin-sharded", "file"])
def test_every_layout_matches_numpy(tmp_path, layout):
    b, runs = states()
    base_path = save(b, tmp_path / "base", layout)
    run_paths = [save(r, tmp_path / f"run{i}", layout) for i, r in enumerate(runs)]
    a = analyze(base_path, run_paths)
    assert a.result.complete and not a.result.skipped
    check_against(a.result, expected(b, runs, "bf16"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("criterion,value", [("atol", 1e-5), ("atol", 1e-3), ("exact", 0.0), ("relative", 1e-3)])
def test_dtypes_and_criteria_match_numpy(tmp_path, dtype, criterion, value):
    b, runs = states(dtype=dtype, scale=3e-4)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    a = analyze(tmp_path / "base", [tmp_path / f"run{i}" for i in range(3)], criterion=Criterion(criterion, value),
                rank=False)
    check_against(a.result, expected(b, runs, DTYPE_NAMES[dtype], criterion, value))


def test_bf16_tolerance_boundary_matches_reference_isclose(tmp_path):
    """Δ exactly bf16(1e-5) = 1.00136e-5 is *not* updated (as torch.isclose in bf16); the next value up is."""
    t = torch.tensor(1e-5, dtype=torch.bfloat16)
    up = (t.view(torch.int16) + 1).view(torch.bfloat16)  # the next bf16 value above
    assert up > t
    base = torch.zeros(4, 8, dtype=torch.bfloat16)
    run = base.clone()
    run[0, 0] = t          # at the boundary: not updated
    run[0, 1] = -t         # also not updated
    run[0, 2] = up         # just above: updated
    run[0, 3] = 5e-6       # sub-tolerance: not updated
    run[1, :] = 0.5        # clearly updated
    save({"w": base}, tmp_path / "base")
    save({"w": run}, tmp_path / "run")
    a = analyze(tmp_path / "base", [tmp_path / "run"], rank=False)
    got = a.result.tensors["w"].runs[0].updated
    reference_count = int((~torch.isclose(run - base, torch.zeros_like(base), atol=1e-5)).sum())
    assert got == reference_count == 9


def test_sweep_in_one_pass_equals_separate_runs(tmp_path):
    b, runs = states(scale=2e-5)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    paths = [tmp_path / f"run{i}" for i in range(3)]
    sweep = (1e-8, 1e-7, 1e-6, 1e-5)
    a = analyze(tmp_path / "base", paths, sweep=sweep, rank=False)
    s = a.result.stats()
    for j, t in enumerate(sweep):
        single = analyze(tmp_path / "base", paths, criterion=Criterion("atol", t), rank=False).result.stats()
        for i in range(3):
            assert s.sweep_sparsity(i, j) == single.sparsity(i)
    # the sweep is not trivially flat on this data
    assert s.sweep_sparsity(0, 0) != s.sweep_sparsity(0, 3)


def test_nan_and_inf_count_as_updated_and_are_reported(tmp_path, capsys):
    base = torch.zeros(3, 4, dtype=torch.float32)
    run = base.clone()
    run[0, 0] = float("nan")
    run[1, 1] = float("inf")
    base2 = base.clone()
    base2[2, 2] = float("nan")  # NaN in the base, same NaN in the run
    run[2, 2] = float("nan")
    save({"w": base2}, tmp_path / "base")
    save({"w": run}, tmp_path / "run")
    a = analyze(tmp_path / "base", [tmp_path / "run"])
    r = a.result.tensors["w"].runs[0]
    assert r.updated == 3 and r.nonfinite == 3
    assert r.rank is None and any("NaN" in n for n in a.result.tensors["w"].notes)


def test_prefix_mismatch_is_matched(tmp_path):
    b, runs = states(k=2)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save({n.removeprefix("model."): t for n, t in r.items()}, tmp_path / f"run{i}")
    a = analyze(tmp_path / "base", [tmp_path / "run0", tmp_path / "run1"], rank=False)
    assert not a.result.skipped
    assert set(a.result.tensors) == set(LLAMA_SHAPES)  # named as the base stores them
    check_against(a.result, expected(b, runs, "bf16"))


def test_shape_mismatch_is_listed_and_common_rows_compares(tmp_path):
    b, runs = states(k=2)
    grown = dict(runs[1])
    extra = torch.zeros(4, 32, dtype=torch.bfloat16)
    grown["model.embed_tokens.weight"] = torch.cat([runs[1]["model.embed_tokens.weight"], extra])
    save(b, tmp_path / "base")
    save(runs[0], tmp_path / "run0")
    save(grown, tmp_path / "run1")
    paths = [tmp_path / "run0", tmp_path / "run1"]
    a = analyze(tmp_path / "base", paths, rank=False)
    assert "model.embed_tokens.weight" not in a.result.tensors
    (skip,) = a.result.skipped
    assert skip.tensor == "model.embed_tokens.weight" and skip.run == "run1"
    assert "[68, 32]" in skip.reason and "[64, 32]" in skip.reason and "--common-rows" in skip.reason
    a = analyze(tmp_path / "base", paths, rank=False, common_rows=True)
    assert not a.result.skipped
    check_against(a.result, expected(b, runs, "bf16"))


def test_missing_and_extra_tensors_are_listed(tmp_path):
    b, runs = states(k=1)
    r = dict(runs[0])
    del r["model.layers.1.mlp.up_proj.weight"]
    r["model.layers.2.mlp.up_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save(b, tmp_path / "base")
    save(r, tmp_path / "run")
    a = analyze(tmp_path / "base", [tmp_path / "run"], rank=False)
    reasons = {(k.tensor, k.reason) for k in a.result.skipped}
    assert ("model.layers.1.mlp.up_proj.weight", "missing in this run") in reasons
    assert ("model.layers.2.mlp.up_proj.weight", "only in this run, not in the base") in reasons
    assert len(a.result.tensors) == len(LLAMA_SHAPES) - 1


def test_mixed_dtypes_compare_in_less_precise(tmp_path):
    b = base_state(dtype=torch.bfloat16)
    run32 = {n: t.float() + 1e-4 * (torch.arange(t.numel()).reshape(t.shape) % 3 == 0) for n, t in b.items()}
    save(b, tmp_path / "base")
    save(run32, tmp_path / "run")
    a = analyze(tmp_path / "base", [tmp_path / "run"], rank=False)
    r = a.result.tensors["model.norm.weight"]
    # the cast is named once for the run (issue 9: not one line per tensor)
    assert r.dtype == "bf16" and r.runs[0].dtype == "bf16" and not r.notes
    cast = [n for n in a.result.notes if "compared in bf16" in n]
    assert len(cast) == 1 and "'run'" in cast[0] and f"{len(b)} tensors fp32 vs base bf16" in cast[0]
    run_bf = {n: t.to(torch.bfloat16) for n, t in run32.items()}
    check = reference.pooled([[reference.mask(b[n].float().numpy(), run_bf[n].float().numpy(), "bf16")
                               for n in b]])
    assert int(a.result.stats().updated[0]) == check["updated"][0]


def test_per_tensor_rows_and_ranks(tmp_path):
    b, runs = states(k=2)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    a = analyze(tmp_path / "base", [tmp_path / "run0", tmp_path / "run1"])
    for name, tr in a.result.tensors.items():
        for i, s in enumerate(tr.runs):
            d = reference.stored_delta(b[name].float().numpy(), runs[i][name].float().numpy(), "bf16")
            if d.ndim == 2:
                assert s.rank == reference.numpy_rank(d)
            else:
                assert s.rank is None
            assert s.sum_abs_delta == pytest.approx(float(np.abs(d.astype(np.float64)).sum()), rel=1e-6)


def test_cache_reopens_and_resumes_identically(tmp_path):
    b, runs = states(k=2)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    paths = [str(tmp_path / "run0"), str(tmp_path / "run1")]
    opts = dict(cache_dir=tmp_path / "cache", sweep=(1e-6,))
    first = Analysis(str(tmp_path / "base"), paths, AnalysisOptions(**opts))
    events = list(first.run())
    assert not any(e.cached for e in events)
    first.close()
    again = Analysis(str(tmp_path / "base"), paths, AnalysisOptions(**opts))
    events = list(again.run())
    assert all(e.cached for e in events) and again.result.complete
    assert again.result.stats().updated.tolist() == first.result.stats().updated.tolist()
    # a changed criterion is recomputed, but ranks come from the cache
    other = Analysis(str(tmp_path / "base"), paths, AnalysisOptions(criterion=Criterion("exact"), **opts))
    events = list(other.run())
    assert not any(e.cached for e in events)
    ranks = [s.rank for r in other.result.tensors.values() for s in r.runs]
    assert ranks == [s.rank for r in first.result.tensors.values() for s in r.runs]


def test_labels_and_single_run(tmp_path):
    b, runs = states(k=1)
    save(b, tmp_path / "base")
    save(runs[0], tmp_path / "x" / "ckpt")
    save(runs[0], tmp_path / "y" / "ckpt")
    a = Analysis(str(tmp_path / "base"), [f"seedA={tmp_path / 'x' / 'ckpt'}", str(tmp_path / "y" / "ckpt"),
                                          str(tmp_path / "y" / "ckpt")], AnalysisOptions(use_cache=False))
    assert a.result.run_labels == ["seedA", "ckpt", "ckpt-2"]
    assert any("same checkpoint" in n for n in a.result.notes)
    a.close()
    single = analyze(tmp_path / "base", [tmp_path / "x" / "ckpt"])
    assert list(single.result.stats().pairs()) == []


def test_sixteen_runs(tmp_path):
    b = base_state(shapes={"model.layers.0.mlp.up_proj.weight": (24, 16), "model.norm.weight": (16,)})
    save(b, tmp_path / "base")
    runs = [sparse_run(b, s) for s in range(16)]
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    a = analyze(tmp_path / "base", [tmp_path / f"run{i}" for i in range(16)], rank=False)
    check_against(a.result, expected(b, runs, "bf16"))
    assert len(a.result.stats().agreement) == 17


def test_outputs_are_complete_and_consistent(tmp_path):
    import csv

    from rlsub_tui.export.outputs import write_outputs

    b, runs = states(k=3)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    a = analyze(tmp_path / "base", [tmp_path / f"run{i}" for i in range(3)], sweep=(1e-8, 1e-5))
    write_outputs(a.result, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    exp = expected(b, runs, "bf16")
    assert summary["criterion"] == {"name": "atol", "value": 1e-5}
    assert [r["updated"] for r in summary["runs"]] == exp["updated"]
    assert summary["agreement"] == exp["agreement"]
    assert summary["consensus"] == pytest.approx(exp["agreement"][3] / exp["numel"])
    assert summary["union"] == pytest.approx(1 - exp["agreement"][0] / exp["numel"])
    assert summary["pairs"][0]["o1"] == pytest.approx(exp["pairs"][(0, 1)]["o1"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "matrices.csv")))
    assert len(rows) == 3 * len(LLAMA_SHAPES)
    assert {"sparsity@1e-08", "sparsity@1e-05", "rank", "max_rank"} <= set(rows[0])
    norm = next(r for r in rows if r["tensor"] == "model.norm.weight")
    assert norm["rank"] == "" and norm["max_rank"] == ""
    q = next(r for r in rows if r["tensor"] == "model.layers.0.self_attn.q_proj.weight" and r["run"] == "run1")
    d = reference.stored_delta(b["model.layers.0.self_attn.q_proj.weight"].float().numpy(),
                               runs[1]["model.layers.0.self_attn.q_proj.weight"].float().numpy(), "bf16")
    assert int(q["rank"]) == reference.numpy_rank(d) and int(q["max_rank"]) == 32
    pairs = list(csv.DictReader(open(tmp_path / "out" / "pairs.csv")))
    assert len(pairs) == 3 * len(LLAMA_SHAPES)
    agree = list(csv.DictReader(open(tmp_path / "out" / "agreement.csv")))
    assert all(sum(int(r[f"agree_{j}"]) for j in range(4)) == int(r["numel"]) for r in agree)
    groups = list(csv.DictReader(open(tmp_path / "out" / "groups.csv")))
    levels = {(g["group"], g["level"]) for g in groups}
    assert {("model", "model"), ("model.layers.1", "layer"), ("model.layers.0.mlp", "submodule"),
            ("type:mlp.down_proj.weight", "type"), ("kind:norm", "kind")} <= levels
    model_run0 = next(g for g in groups if g["group"] == "model" and g["run"] == "run0")
    assert int(model_run0["updated"]) == exp["updated"][0]
    layer = [n for n in LLAMA_SHAPES if n.startswith("model.layers.1.")]
    layer_exp = expected(b, runs, "bf16", names=layer)
    layer_run2 = next(g for g in groups if g["group"] == "model.layers.1" and g["run"] == "run2")
    assert float(layer_run2["sparsity"]) == pytest.approx(layer_exp["sparsity"][2], rel=1e-12)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


def test_finished_analysis_reopens_from_cache_without_torch(tmp_path):
    import subprocess
    import sys

    from rlsub_tui.compute.cache import reopen

    b, runs = states(k=2)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    paths = [f"first={tmp_path / 'run0'}", str(tmp_path / "run1")]
    opts = AnalysisOptions(cache_dir=tmp_path / "cache", sweep=(1e-6,))
    assert reopen(str(tmp_path / "base"), paths, opts) is None  # nothing cached yet
    a = Analysis(str(tmp_path / "base"), paths, opts)
    a.run_all()
    a.close()
    again = reopen(str(tmp_path / "base"), paths, opts)
    assert again is not None and again.complete and again.run_labels == ["first", "run1"]
    assert again.stats().updated.tolist() == a.result.stats().updated.tolist()
    assert again.planned == a.result.planned and again.sweep == (1e-6,)
    # other options, or a changed checkpoint, are not served from the cache
    assert reopen(str(tmp_path / "base"), paths, AnalysisOptions(cache_dir=tmp_path / "cache")) is None
    save(sparse_run(b, 9), tmp_path / "run1")
    assert reopen(str(tmp_path / "base"), paths, opts) is None
    # and the lookup itself never imports torch
    code = ("import sys; from rlsub_tui.compute.cache import reopen; from rlsub_tui.records.criteria import AnalysisOptions; "
            f"reopen({str(tmp_path / 'base')!r}, {paths!r}, AnalysisOptions(cache_dir={str(tmp_path / 'cache')!r})); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_prints_a_one_screen_summary(tmp_path, capsys):
    from rlsub_tui.cli.main import main

    b, runs = states(k=3)
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"a-rather-long-run-name-{i}")
    args = ["analyze", str(tmp_path / "base")] + [str(tmp_path / f"a-rather-long-run-name-{i}") for i in range(3)]
    assert main(args + ["--out", str(tmp_path / "out"), "--quiet", "--sweep", "1e-6"]) == 0
    out = capsys.readouterr().out
    exp = expected(b, runs, "bf16")
    assert "a-rather-long-run-name-0 vs a-rather-long-run-name-2" in out
    assert f"{100 * exp['sparsity'][1]:.1f}%" in out
    p = exp["pairs"][(0, 1)]
    assert f"{100 * p['o1']:.1f}%" in out and f"{p['jaccard']:.3f}" in out
    assert len(out.splitlines()) < 40
