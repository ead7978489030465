"""The one entry point (analysis.analyse): its events, who owns the result, the cache, and labels and tolerances."""

from __future__ import annotations

import subprocess
import sys

import pytest
import reference
import torch
from synthetic import base_state, save, sparse_run

from rlsub_tui.analysis.stream import analyse, batched
from rlsub_tui.checkpoints.labels import checkpoint_label, run_labels, run_paths
from rlsub_tui.records.criteria import AnalysisOptions, Criterion, parse_sweep, parse_tolerance
from rlsub_tui.records.events import Computed, Finished, Opened, Progress


@pytest.fixture
def pair3(tmp_path):
    b = base_state(dtype=torch.bfloat16)
    runs = [sparse_run(b, s) for s in range(3)]
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    return tmp_path, b, runs


def consume(events):
    """What a consumer does with the stream: its own result, filled from Progress events."""
    seen, result = [], None
    for e in events:
        seen.append(e)
        if isinstance(e, Opened):
            result = e.result
        elif isinstance(e, Progress):
            result.tensors[e.result.name] = e.result
        elif isinstance(e, Finished):
            result.complete = e.complete
    return result, seen


def test_events_in_order_and_figures_match_numpy(pair3):
    root, b, runs = pair3
    specs = [f"first={root / 'run0'}", str(root / "run1"), str(root / "run2")]
    result, seen = consume(analyse(str(root / "base"), specs, AnalysisOptions(use_cache=False, rank=False)))
    assert isinstance(seen[0], Opened) and isinstance(seen[-1], Finished) and seen[-1].complete
    progress = seen[1:-1]
    assert all(isinstance(p, Progress) and not p.cached for p in progress)
    assert [p.done for p in progress] == list(range(1, len(result.planned) + 1))
    assert sorted(result.tensors) == sorted(result.planned) and result.complete
    assert result.run_labels == ["first", "run1", "run2"]
    # pooled counts against an independent numpy computation on the same arrays
    names = result.planned
    masks = [[reference.mask(b[n].float().numpy(), r[n].float().numpy(), "bf16", "atol", 1e-5) for n in names]
             for r in runs]
    assert [int(u) for u in result.stats().updated] == [int(sum(m.sum() for m in ms)) for ms in masks]


def test_the_core_never_writes_into_the_result_it_handed_out(pair3):
    root, _, _ = pair3
    events = analyse(str(root / "base"), [str(root / "run0"), str(root / "run1")],
                     AnalysisOptions(use_cache=False, rank=False))
    opened = next(events)
    assert isinstance(opened, Opened) and opened.result.tensors == {}
    notes, skipped = list(opened.result.notes), list(opened.result.skipped)
    rest = list(events)
    assert isinstance(rest[-1], Finished) and rest[-1].complete
    # the consumer added nothing, so nothing was added: no tensors, same notes, not marked complete
    assert opened.result.tensors == {} and opened.result.notes == notes and opened.result.skipped == skipped
    assert not opened.result.complete


def test_a_finished_analysis_reopens_from_the_cache_with_the_same_figures(pair3):
    root, _, _ = pair3
    specs = [str(root / "run0"), str(root / "run1")]
    opts = AnalysisOptions(cache_dir=root / "cache", rank=False, sweep=(1e-6,))
    first, seen = consume(analyse(str(root / "base"), specs, opts))
    assert not any(getattr(e, "cached", False) for e in seen)
    again, seen = consume(analyse(str(root / "base"), specs, opts))
    assert all(e.cached for e in seen if isinstance(e, Progress)) and again.complete
    assert again.device.endswith("from cache")
    assert again.stats().updated.tolist() == first.stats().updated.tolist()
    assert again.stats().sweep.tolist() == first.stats().sweep.tolist()
    # served without importing torch
    code = ("import sys; from rlsub_tui.analysis.stream import analyse; from rlsub_tui.records.criteria import AnalysisOptions; "
            f"events = list(analyse({str(root / 'base')!r}, {specs!r}, AnalysisOptions(cache_dir={str(root / 'cache')!r}, "
            "rank=False, sweep=(1e-6,)))); print(len(events), events[-1].complete, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(seen)), "True", "False"]


def test_cancelled_keeps_what_is_done_and_is_not_complete(pair3):
    root, _, _ = pair3
    done = []
    events = analyse(str(root / "base"), [str(root / "run0")], AnalysisOptions(use_cache=False, rank=False),
                     cancelled=lambda: len(done) >= 2)
    result, seen = consume(e for e in events if not (isinstance(e, Progress) and done.append(e)))
    assert isinstance(seen[-1], Finished) and not seen[-1].complete
    assert len(done) == 2 < len(result.planned)


def test_bad_input_is_refused_before_anything_is_yielded(pair3):
    from rlsub_tui.util.errors import InputError

    root, _, _ = pair3
    with pytest.raises(InputError, match="nowhere"):
        next(analyse(str(root / "base"), [str(root / "nowhere")], AnalysisOptions(use_cache=False)))


def _progress(i: int) -> Progress:
    return Progress(i, 3, 0, 0, 0.0, f"t{i}", False)


def test_batched_gathers_progress_and_keeps_every_other_event_in_place():
    stream = [Opened("result", 0), _progress(1), _progress(2), _progress(3), Finished(True)]
    out = list(batched(iter(stream), seconds=3600))
    assert [type(e) for e in out] == [Opened, Computed, Finished]
    assert out[1].results == ["t1", "t2", "t3"] and out[1].progress.done == 3
    every = list(batched(iter(stream), seconds=0))
    assert [e.results for e in every if isinstance(e, Computed)] == [["t1"], ["t2"], ["t3"]]
    assert list(batched(iter([_progress(1)]), seconds=3600))[0].results == ["t1"]  # flushed at the end


def test_labels_from_paths_and_names(tmp_path):
    assert checkpoint_label("/data/ckpt/") == "ckpt" and checkpoint_label("/") == "/"
    actor = tmp_path / "seed2" / "actor"  # verl's role folder outside a global_step_N/: named by its run
    actor.mkdir(parents=True)
    assert checkpoint_label(str(actor)) == "actor"  # no rank files: a folder like any other
    (actor / "model_world_size_2_rank_0.pt").touch()
    assert checkpoint_label(str(actor)) == checkpoint_label(str(actor / "model_world_size_2_rank_0.pt")) == "seed2"
    specs = ["seedA=/x/ckpt", "/y/ckpt", "/z/ckpt", "/w/other"]
    assert run_labels(specs) == ["seedA", "ckpt", "ckpt-2", "other"]
    assert run_paths(specs) == ["/x/ckpt", "/y/ckpt", "/z/ckpt", "/w/other"]


@pytest.mark.parametrize("text,value", [("1e-5", 1e-5), (" 0 ", 0.0), ("2", 2.0)])
def test_tolerance_parser_accepts(text, value):
    assert parse_tolerance(text) == value


@pytest.mark.parametrize("text,why", [("abc", "is not a number"), ("-1", "must be a finite number >= 0"),
                                      ("nan", "must be a finite number >= 0"), ("inf", "must be a finite number")])
def test_tolerance_parser_refuses_with_the_reason(text, why):
    with pytest.raises(ValueError, match=why):
        parse_tolerance(text, "eta")
    with pytest.raises(ValueError, match="^eta "):
        parse_tolerance(text, "eta")


def test_sweep_parser():
    assert parse_sweep("1e-5, 1e-8,1e-7") == (1e-8, 1e-7, 1e-5)
    assert parse_sweep("none") == parse_sweep("OFF") == parse_sweep("") == ()
    with pytest.raises(ValueError, match="sweep value 'x' is not a number"):
        parse_sweep("1e-5,x")
    assert Criterion("atol", parse_tolerance("1e-6")).value == 1e-6


def test_cli_bar_ends_on_the_last_tensor_and_quiet_has_none(pair3, capsys):
    from rlsub_tui.cli.main import main

    root, _, _ = pair3
    args = ["analyze", str(root / "base"), str(root / "run0"), "--no-cache", "--no-rank"]
    assert main(args + ["--out", str(root / "out")]) == 0
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if "tensors" in line][-1]
    assert "left" in last and "/s" in last and "Traceback" not in err
    done, total = last.split("tensors")[0].split()[-1].split("/")
    rows = (root / "out" / "matrices.csv").read_text().splitlines()
    assert done == total and int(total) == len(rows) - 1  # one row per tensor with one run
    assert main(args + ["--quiet", "--out", str(root / "out2")]) == 0
    assert "tensors" not in capsys.readouterr().err


def test_a_timeline_pass_follows_the_runs_and_ends_before_finished(tmp_path):
    from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs
    from rlsub_tui.records.events import TimelineDone, TimelineStep

    b = base_state(dtype=torch.bfloat16)
    save(b, tmp_path / "base")
    cur = b
    for step in (10, 20, 30):
        cur = sparse_run(cur, step, density=0.05)
        save(cur, tmp_path / "tl" / f"checkpoint-{step}")
    save(sparse_run(b, 99), tmp_path / "plain")
    resolved = resolve_runs([str(tmp_path / "tl"), str(tmp_path / "plain")])
    options = AnalysisOptions(use_cache=False, rank=False)
    result, seen = consume(analyse(str(tmp_path / "base"), run_specs(resolved), options, resolved.timelines))
    kinds = [type(e).__name__ for e in seen]
    first_step = kinds.index("TimelineStep")
    assert kinds[0] == "Opened" and set(kinds[1:first_step]) == {"Progress"}
    assert set(kinds[first_step:-2]) == {"TimelineStep"} and kinds[-2:] == ["TimelineDone", "Finished"]
    assert result.run_labels == ["tl", "plain"] and result.complete
    timeline = next(e.timeline for e in seen if isinstance(e, TimelineDone))
    assert [r.steps for r in timeline.runs] == [[10, 20, 30]]
    # the last step stands for the timeline: its vs-base counts are the runs pass's updated counts
    last = {row.tensor: row.updated_vs_base for row in timeline.rows if row.step == 30}
    assert last == {name: t.runs[0].updated for name, t in result.tensors.items()}
    assert [e.progress.done for e in seen if isinstance(e, TimelineStep)][-1] == len(result.planned)
