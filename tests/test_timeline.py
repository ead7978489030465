"""Training timelines: finding step checkpoints, and every per-step number checked against numpy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from synthetic import base_state, save, sparse_run

from rlsub_tui.checkpoints.step_folders import find_timeline, resolve_runs
from rlsub_tui.cli.main import main
from rlsub_tui.util.errors import InputError


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def timeline_states(n_steps=4, seed=0):
    """A bf16 base and a run saved at n_steps checkpoints, each a sparse step from the one before."""
    b = base_state(seed)
    states, cur = [], b
    for i in range(n_steps):
        cur = sparse_run(cur, 100 * seed + i, density=0.06, scale=3e-3)
        if i == 2:  # some parameters go back exactly to the base: the union keeps them, the vs-base mask does not
            name = "model.layers.0.mlp.up_proj.weight"
            cur = dict(cur)
            cur[name] = torch.where(torch.arange(cur[name].numel()).reshape(cur[name].shape) % 3 == 0, b[name], cur[name])
        states.append(cur)
    return b, states


def write_timeline(root: Path, states, steps, layout=lambda s: f"checkpoint-{s}", nested=""):
    for s, state in zip(steps, states):
        save(state, root / layout(s) / nested if nested else root / layout(s))
    return root


def bits(t):
    return t.contiguous().view(torch.int16).numpy()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- finding timelines -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, nested", [
    (lambda s: f"checkpoint-{s}", ""),
    (lambda s: f"global_step_{s}", "actor/huggingface"),
    (lambda s: f"global_step_{s}", "huggingface"),
    (lambda s: f"step_{s}", ""),
    (lambda s: f"step-{s}", ""),
    (lambda s: f"iter_{s:07d}", ""),
])
def test_finds_step_checkpoints_in_step_order(tmp_path, layout, nested):
    b, states = timeline_states(3)
    write_timeline(tmp_path / "run", states, [1000, 20, 300], layout, nested)
    (tmp_path / "run" / "logs").mkdir()
    t = find_timeline(str(tmp_path / "run"))
    assert t.steps == [20, 300, 1000]
    want = [tmp_path / "run" / layout(s) / nested if nested else tmp_path / "run" / layout(s) for s in (20, 300, 1000)]
    assert [p.resolve() for p in t.checkpoints] == [p.resolve() for p in want]
    r = resolve_runs([str(tmp_path / "run"), f"named={tmp_path / 'run'}"])
    assert r.labels == ["run", "named"] and r.paths == [str(t.checkpoints[-1])] * 2 and set(r.timelines) == {0, 1}


def test_not_a_timeline(tmp_path):
    b, states = timeline_states(2)
    save(b, tmp_path / "plain")
    write_timeline(tmp_path / "one", states[:1], [5])
    assert find_timeline(str(tmp_path / "plain")) is None  # a checkpoint itself
    assert find_timeline(str(tmp_path / "one")) is None  # a single step is not a timeline
    write_timeline(tmp_path / "dup", states, [5, 6], layout=lambda s: "checkpoint-7" if s == 5 else "step_7")
    with pytest.raises(InputError, match="both step 7"):
        find_timeline(str(tmp_path / "dup"))
    write_timeline(tmp_path / "hole", states, [5, 6])
    (tmp_path / "hole" / "checkpoint-9").mkdir()
    with pytest.raises(InputError, match="checkpoint-9: holds no checkpoint"):
        find_timeline(str(tmp_path / "hole"))


# --- the numbers -----------------------------------------------------------------------------------------------

def expected_rows(b, states, steps, gap=1, criterion="atol", value=1e-5):
    """timeline.csv's rows, from numpy: masks by the reference, patches by comparing stored bits."""
    rows = {}
    first_hist = np.zeros(len(steps) + 1, dtype=np.int64)
    versions = [b] + states
    for name in b:
        f32 = [v[name].float().numpy() for v in versions]
        vs_base = [None] + [reference.mask(f32[0], f32[j], "bf16", criterion, value) for j in range(1, len(versions))]
        step_mask = {j: reference.mask(f32[j - gap], f32[j], "bf16", criterion, value)
                     for j in range(gap, len(versions))}
        union = np.zeros(f32[0].shape, dtype=bool)
        first = np.zeros(f32[0].shape, dtype=np.int64)
        for j in range(1, len(versions)):
            first[vs_base[j] & ~union & (first == 0)] = j
            union |= vs_base[j]
            row = {"numel": f32[0].size, "updated_vs_base": int(vs_base[j].sum()), "union_so_far": int(union.sum()),
                   "dense_bytes": f32[0].size * 2, "prev_step": None, "updated_vs_prev": None, "patch_bytes": None,
                   "overlap_prev": None, "overlap_prev_random": None}
            if j - gap >= 0:
                p = j - gap
                row["prev_step"] = 0 if p == 0 else steps[p - 1]
                row["updated_vs_prev"] = int(step_mask[j].sum())
                changed = int((bits(versions[p][name]) != bits(versions[j][name])).sum())
                row["patch_bytes"] = changed * (4 + 2)
                if p - gap >= 0:
                    both = int((step_mask[j] & step_mask[p]).sum())
                    row["overlap_prev"] = both / row["updated_vs_prev"] if row["updated_vs_prev"] else None
                    row["overlap_prev_random"] = int(step_mask[p].sum()) / f32[0].size
            rows[(name, steps[j - 1])] = row
        first_hist += np.bincount(first.reshape(-1), minlength=len(steps) + 1)
    return rows, first_hist


def as_number(text):
    return None if text == "" else float(text)


@pytest.mark.parametrize("gap", [1, 2])
def test_timeline_csv_and_summary_match_numpy(tmp_path, capsys, gap):
    b, states = timeline_states(4)
    steps = [50, 100, 150, 200]
    save(b, tmp_path / "base")
    write_timeline(tmp_path / "seed1", states, steps)
    save(sparse_run(b, 9), tmp_path / "plain")
    code, out, err = cli(["analyze", tmp_path / "base", tmp_path / "seed1", tmp_path / "plain", "--out",
                          tmp_path / "out", "--quiet", "--no-rank", "--step-gap", gap], capsys)
    assert code == 0, err
    assert "seed1 is a timeline of 4 checkpoints" in err
    assert f"timeline seed1 (step gap {gap}):" in out
    rows = read_csv(tmp_path / "out" / "timeline.csv")
    want, first_hist = expected_rows(b, states, steps, gap)
    assert len(rows) == len(want) == len(b) * len(steps)
    for r in rows:
        assert r["run"] == "seed1"
        w = want[(r["tensor"], int(r["step"]))]
        for col, value in w.items():
            got = as_number(r[col])
            if value is None:
                assert got is None, (col, r)
            else:
                assert got == pytest.approx(value, rel=1e-12), (col, r)
    assert any(int(r["union_so_far"]) > int(r["updated_vs_base"]) for r in rows)  # parameters that went back
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (tl,) = summary["timelines"]
    assert tl["label"] == "seed1" and tl["steps"] == steps and tl["step_gap"] == gap
    n = sum(t.numel() for t in b.values())
    for s, pooled in zip(steps, tl["per_step"]):
        mine = [w for (name, step), w in want.items() if step == s]
        assert pooled["numel"] == n
        assert pooled["sparsity_vs_base"] == pytest.approx(1 - sum(w["updated_vs_base"] for w in mine) / n)
        assert pooled["union_so_far"] == sum(w["union_so_far"] for w in mine)
        from rlsub_tui.util.formatting import pct
        assert any(line.strip().endswith(pct(pooled["patch_ratio"])) and pct(pooled["sparsity_vs_base"]) in line
                   for line in out.splitlines() if line.strip().startswith(f"{pooled['prev_step']} → {s}")
                   ) or pooled["prev_step"] is None
        assert pooled["dense_bytes"] == 2 * n
        if mine[0]["patch_bytes"] is not None:
            assert pooled["patch_bytes"] == sum(w["patch_bytes"] for w in mine)
            assert pooled["sparsity_vs_prev"] == pytest.approx(1 - sum(w["updated_vs_prev"] for w in mine) / n)
    assert tl["first_changed"] == {**{str(s): int(c) for s, c in zip(steps, first_hist[1:])},
                                   "never": int(first_hist[0])}
    # the timeline's last step is the run for overlap and agreement: same numbers as naming it directly
    assert [r["label"] for r in summary["runs"]] == ["seed1", "plain"]
    code, _, err = cli(["analyze", tmp_path / "base", f"seed1={tmp_path / 'seed1' / 'checkpoint-200'}",
                        tmp_path / "plain", "--out", tmp_path / "direct", "--quiet", "--no-rank"], capsys)
    assert code == 0, err
    direct = json.loads((tmp_path / "direct" / "summary.json").read_text())
    for key in ("runs", "pairs", "agreement", "union", "consensus"):
        a, d = summary[key], direct[key]
        if key == "runs":
            a = [{k: v for k, v in r.items() if k != "path"} for r in a]
            d = [{k: v for k, v in r.items() if k != "path"} for r in d]
        assert a == d, key
    assert not (tmp_path / "direct" / "timeline.csv").exists() and "timelines" not in direct


def test_two_timelines_and_exact_criterion(tmp_path, capsys):
    b, s1 = timeline_states(3, seed=0)
    _, s2 = timeline_states(3, seed=0)
    s2 = [sparse_run(s, 50 + i, density=0.02) for i, s in enumerate(s2)]
    save(b, tmp_path / "base")
    write_timeline(tmp_path / "a", s1, [1, 2, 3])
    write_timeline(tmp_path / "b", s2, [10, 20, 30], layout=lambda s: f"global_step_{s}", nested="actor/huggingface")
    code, _, err = cli(["analyze", tmp_path / "base", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "out",
                        "--quiet", "--no-rank", "--criterion", "exact"], capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "out" / "timeline.csv")
    for label, states, steps in (("a", s1, [1, 2, 3]), ("b", s2, [10, 20, 30])):
        want, _ = expected_rows(b, states, steps, 1, "exact", 0.0)
        mine = [r for r in rows if r["run"] == label]
        assert len(mine) == len(want)
        for r in mine:
            w = want[(r["tensor"], int(r["step"]))]
            assert int(r["updated_vs_base"]) == w["updated_vs_base"]
            assert int(r["updated_vs_prev"]) == w["updated_vs_prev"]
            assert int(r["patch_bytes"]) == w["patch_bytes"]


# --- bad input -------------------------------------------------------------------------------------------------

def test_timelines_that_disagree_are_refused(tmp_path, capsys):
    b, states = timeline_states(3)
    save(b, tmp_path / "base")
    missing = dict(states[1])
    del missing["model.norm.weight"]
    write_timeline(tmp_path / "names", [states[0], missing, states[2]], [1, 2, 3])
    reshaped = dict(states[2])
    reshaped["model.norm.weight"] = torch.zeros(31, dtype=torch.bfloat16)
    write_timeline(tmp_path / "shapes", [states[0], states[1], reshaped], [1, 2, 3])
    for run, needles in (("names", ["model.norm.weight", "checkpoint-1", "not in", "checkpoint-2"]),
                         ("shapes", ["model.norm.weight", "shape [31]", "[32]"])):
        out = tmp_path / f"out-{run}"
        code, _, err = cli(["analyze", tmp_path / "base", tmp_path / run, "--out", out, "--quiet", "--no-rank"],
                           capsys)
        assert code == 2, err
        lines = [l for l in err.splitlines() if l.startswith("rlsub-tui: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        for n in needles:
            assert n in lines[0], (n, lines[0])
        assert not out.exists()
    code, _, err = cli(["analyze", tmp_path / "base", tmp_path / "names", "--out", tmp_path / "o", "--step-gap", "0"],
                       capsys)
    assert code == 2 and "--step-gap 0" in err


def test_masks_and_transplant_take_a_timeline_as_its_last_step(tmp_path, capsys):
    b, states = timeline_states(2)
    save(b, tmp_path / "base")
    write_timeline(tmp_path / "tl", states, [1, 2])
    mask = tmp_path / "m.safetensors"
    code, _, err = cli(["masks", tmp_path / "base", tmp_path / "tl", "--per-run", "--criterion", "exact",
                        "--out", mask, "--quiet"], capsys)
    assert code == 0, err
    code, _, err = cli(["transplant", tmp_path / "base", tmp_path / "tl", "--mask", mask, "--out", tmp_path / "t",
                        "--quiet"], capsys)
    assert code == 0, err
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "t" / "model.safetensors"))
    for n, t in states[-1].items():
        np.testing.assert_array_equal(bits(got[n]), bits(t))
    code, _, err = cli(["transplant", tmp_path / "base", tmp_path / "tl", "--mask", mask, "--out",
                        tmp_path / "tl" / "t2", "--quiet"], capsys)
    assert code == 2 and "input checkpoint directory" in err


# --- the explorer's chart ---------------------------------------------------------------------------------------

async def test_explorer_draws_the_timeline_of_the_focused_node(tmp_path):
    from rlsub_tui.checkpoints.step_folders import run_specs
    from rlsub_tui.records.criteria import AnalysisOptions
    from rlsub_tui.summaries import tree as explore
    from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
    from rlsub_tui.ui.chart import ChartPanel

    b, states = timeline_states(3)
    steps = [10, 20, 30]
    save(b, tmp_path / "base")
    write_timeline(tmp_path / "tl", states, steps)
    save(sparse_run(b, 4), tmp_path / "plain")
    resolved = resolve_runs([str(tmp_path / "tl"), str(tmp_path / "plain")])
    app = ExplorerApp(ExplorerConfig(str(tmp_path / "base"), run_specs(resolved), AnalysisOptions(rank=False),
                                     tmp_path / "exports", timelines=resolved.timelines))
    want, _ = expected_rows(b, states, steps)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        app._redraw_results()
        await pilot.press("t")
        await pilot.pause()
        assert app.result.run_labels == ["tl", "plain"]
        for key, names in (("model", list(b)), ("tensor:model.layers.0.mlp.up_proj.weight",
                                                ["model.layers.0.mlp.up_proj.weight"])):
            app.focus_node = explore.find(app.roots, key)
            app._show_focus()
            await pilot.pause()
            data = app.query_one(ChartPanel).data
            assert data.name == "timeline" and data.message is None and data.x == steps
            n = sum(b[name].numel() for name in names)
            for i, s in enumerate(steps):
                rows = [want[(name, s)] for name in names]
                assert data.series["tl sparsity vs base"][i] == pytest.approx(100 * (1 - sum(r["updated_vs_base"] for r in rows) / n))
                assert data.series["tl sparsity vs step"][i] == pytest.approx(100 * (1 - sum(r["updated_vs_prev"] for r in rows) / n))
                assert data.series["tl union density"][i] == pytest.approx(100 * sum(r["union_so_far"] for r in rows) / n)

    plain = ExplorerApp(ExplorerConfig(str(tmp_path / "base"), [str(tmp_path / "plain")], AnalysisOptions(rank=False),
                                       tmp_path / "exports"))
    async with plain.run_test(size=(100, 30)) as pilot:
        await plain.workers.wait_for_complete()
        await pilot.pause(0.3)
        await pilot.press("t")
        await pilot.pause()
        data = plain.query_one(ChartPanel).data
        assert data.name == "timeline" and "no timeline" in data.message


async def test_explorer_refuses_a_bad_timeline_before_computing(tmp_path, monkeypatch):
    import rlsub_tui.compute.engine as engine
    from rlsub_tui.checkpoints.step_folders import run_specs
    from rlsub_tui.records.criteria import AnalysisOptions
    from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
    from rlsub_tui.ui.dialogs import ErrorDialog

    b, states = timeline_states(2)
    save(b, tmp_path / "base")
    broken = dict(states[1])
    del broken["lm_head.weight"]
    write_timeline(tmp_path / "tl", [states[0], broken], [1, 2])
    computed = []
    real = engine.compute_tensor
    monkeypatch.setattr(engine, "compute_tensor", lambda *a, **k: computed.append(1) or real(*a, **k))
    resolved = resolve_runs([str(tmp_path / "tl")])
    app = ExplorerApp(ExplorerConfig(str(tmp_path / "base"), run_specs(resolved), AnalysisOptions(rank=False),
                                     tmp_path / "exports", timelines=resolved.timelines))
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        assert isinstance(app.screen, ErrorDialog)
        assert "lm_head.weight" in app.screen.message and "checkpoint-2" in app.screen.message
        assert not computed and not app.running
        assert app.timeline_state.startswith("the timeline was not computed")


# --- the comparison dtype: the timeline compares each pair as the run table does ----------------------------------

NP_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _pair_name(a: torch.dtype, b: torch.dtype, policy: str) -> str:
    """The pair's comparison dtype, written out again here: the less precise of the two, unless forced."""
    if policy != "stored":
        return policy
    return "bf16" if torch.bfloat16 in (a, b) else "fp16" if torch.float16 in (a, b) else "fp32"


def _mask_in(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """numpy's mask of a float32 pair cast to `dtype` first (round to nearest even), as a comparison in it does."""
    cast = {"bf16": reference.round_bf16, "fp16": lambda x: x.astype(np.float16).astype(np.float32),
            "fp32": lambda x: x}[dtype]
    return reference.mask(cast(a), cast(b), dtype)


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "mixed"])
@pytest.mark.parametrize("policy", ["stored", "bf16", "fp16", "fp32"])
def test_fp32_timeline_against_bf16_base_compares_as_the_run_table(tmp_path, capsys, policy, mixed):
    """fp32 step checkpoints of small steps (most below half a bf16 ULP) against a bf16 base, and a mixed timeline
    whose middle step was saved in bf16: every step's count against the base, and against the step before, is
    numpy's in that pair's dtype; the last step equals the run's own matrices.csv row under every --compare-dtype."""
    b = base_state(3)
    states, cur = [], {n: w.float() for n, w in b.items()}
    for i in range(3):
        cur = sparse_run(cur, 40 + i, density=0.3, scale=2e-5)
        states.append(cur)
    if mixed:
        states[1] = {n: w.to(torch.bfloat16) for n, w in states[1].items()}
    steps = [10, 20, 30]
    save(b, tmp_path / "base")
    write_timeline(tmp_path / "seed1", states, steps)
    code, _, err = cli(["analyze", tmp_path / "base", tmp_path / "seed1", "--out", tmp_path / "out", "--quiet",
                        "--no-rank", "--no-cache", "--compare-dtype", policy], capsys)
    assert code == 0, err
    timeline = {(r["tensor"], int(r["step"])): r for r in read_csv(tmp_path / "out" / "timeline.csv")}
    runs = {r["tensor"]: r for r in read_csv(tmp_path / "out" / "matrices.csv")}
    versions = [b] + states
    stored = [next(iter(v.values())).dtype for v in versions]
    differs = 0
    for name in b:
        f32 = [v[name].float().numpy() for v in versions]
        for j, s in enumerate(steps, 1):
            row = timeline[(name, s)]
            vs_base_dtype = _pair_name(stored[0], stored[j], policy)
            assert int(row["updated_vs_base"]) == int(_mask_in(f32[0], f32[j], vs_base_dtype).sum()), (name, s)
            prev_dtype = _pair_name(stored[j - 1], stored[j], policy)
            assert int(row["updated_vs_prev"]) == int(_mask_in(f32[j - 1], f32[j], prev_dtype).sum()), (name, s)
        assert int(timeline[(name, steps[-1])]["updated_vs_base"]) == int(runs[name]["updated"]), name
        differs += int(_mask_in(f32[0], f32[-1], "fp32").sum()) != int(_mask_in(f32[0], f32[-1], "bf16").sum())
    assert differs, "the fixture must tell bf16 and fp32 comparisons apart"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["timelines"][0]["compare_dtype"] == policy


def test_a_step_checkpoint_goes_by_its_run_folder_everywhere(tmp_path, capsys):
    """r/seed1/checkpoint-60 is labelled seed1 in the summary, the printed report and every note (fp32 runs
    against a bf16 base: the cast notes name the run); two steps of one run named together are seed1@20, seed1@60."""
    import re

    b = base_state(5)
    save(b, tmp_path / "base")
    for seed in (1, 2):
        save({n: w.float() for n, w in sparse_run(b, seed).items()}, tmp_path / "r" / f"seed{seed}" / "checkpoint-60")
    save(sparse_run(b, 3), tmp_path / "r" / "seed1" / "checkpoint-20")
    code, out, err = cli(["analyze", tmp_path / "base", tmp_path / "r/seed1/checkpoint-60",
                          tmp_path / "r/seed2/checkpoint-60", "--out", tmp_path / "out", "--quiet", "--no-rank",
                          "--no-cache"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["seed1", "seed2"]
    named = set(re.findall(r"run '([^']+)'", err + out)) | set(re.findall(r"run '([^']+)'", " ".join(summary["notes"])))
    assert named and named <= {"seed1", "seed2"}, named
    assert "checkpoint-60" not in out.replace(str(tmp_path), "")
    code, out, err = cli(["analyze", tmp_path / "base", tmp_path / "r/seed1/checkpoint-20",
                          tmp_path / "r/seed1/checkpoint-60", "--out", tmp_path / "out2", "--quiet", "--no-rank",
                          "--no-cache"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["seed1@20", "seed1@60"]
