"""The analysis in a child process (analysis_process): the same events as in-process, errors as sentences,
and every way a stream ends (finished, cancelled, closed, killed) leaves no child behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import broken_checkpoint

from rlsub_tui.analysis import child as analysis_process
from rlsub_tui.analysis.child import AnalysisError, analyse_in_child, detail_in_child
from rlsub_tui.analysis.stream import analyse
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.records.events import Finished, Opened, Progress
from rlsub_tui.util.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def paths(root: Path) -> tuple[str, list[str]]:
    return str(root / "base"), [str(root / "seed0"), str(root / "seed1")]


def no_children_left() -> bool:
    """Every analysis child of this process has ended and been reaped (the forkserver is not one of them)."""
    return not [p for p in multiprocessing.active_children() if p.name == "rlsub-analysis"]


def test_same_events_and_results_as_in_process(checkpoints):
    base, runs = paths(checkpoints)
    options = AnalysisOptions(use_cache=False, rank=False, device="cpu")
    here = list(analyse(base, runs, options))
    there = list(analyse_in_child(base, runs, options))
    assert [type(e) for e in there] == [type(e) for e in here]
    assert there[0].result.planned == here[0].result.planned
    got = {e.result.name: e.result.to_dict() for e in there if isinstance(e, Progress)}
    want = {e.result.name: e.result.to_dict() for e in here if isinstance(e, Progress)}
    assert got == want
    assert there[-1] == Finished(True, here[-1].notes)
    assert no_children_left()


def test_bad_input_is_the_same_sentence(checkpoints):
    broken_checkpoint(checkpoints)
    base, runs = str(checkpoints / "base"), [str(checkpoints / "seed0"), str(checkpoints / "broken")]
    options = AnalysisOptions(use_cache=False, rank=False, device="cpu")
    with pytest.raises(InputError) as here:
        list(analyse(base, runs, options))
    with pytest.raises(InputError) as there:
        list(analyse_in_child(base, runs, options))
    assert str(there.value) == str(here.value)
    assert no_children_left()


def test_relative_paths_and_the_cache_folder_are_the_consumers(checkpoints, monkeypatch):
    """The forkserver's folder and environment are those of whoever started it first: the child takes ours."""
    monkeypatch.chdir(checkpoints)
    events = list(analyse_in_child("base", ["seed0", "seed1"], AnalysisOptions(rank=False, device="cpu")))
    assert events[-1].complete
    assert (checkpoints / "user-cache" / "results.sqlite").exists()  # conftest's RLSUB_TUI_CACHE_DIR


# Targets the child runs instead of the analysis (pickled by reference: the child imports this module).
def _raises(send, cancelled):
    raise ValueError("boom")


def _sends_then_sleeps(send, cancelled):
    send("first")
    time.sleep(60)


def _until_cancelled(send, cancelled):
    while not cancelled():
        send("tick")
        time.sleep(0.02)
    send(Finished(False, ["stopped"]))


def _ignores_cancel(send, cancelled):
    send("tick")
    time.sleep(60)


def test_any_other_failure_is_worded_as_in_process():
    with pytest.raises(AnalysisError, match=r"^the analysis failed: ValueError: boom$"):
        list(analysis_process._child_stream(_raises, (), lambda: False))
    assert no_children_left()


def test_a_killed_child_is_one_sentence_with_its_exit_code_never_a_hang():
    stream = analysis_process._child_stream(_sends_then_sleeps, (), lambda: False)
    assert next(stream) == "first"
    (child,) = [p for p in multiprocessing.active_children() if p.name == "rlsub-analysis"]
    os.kill(child.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(AnalysisError) as err:
        next(stream)
    assert time.monotonic() - start < 10
    assert "killed by SIGKILL" in str(err.value) and "exit code -9" in str(err.value)
    assert no_children_left()


def test_cancel_lets_the_child_say_it_stopped():
    flag = {"cancel": False}
    got = []
    for item in analysis_process._child_stream(_until_cancelled, (), lambda: flag["cancel"]):
        got.append(item)
        flag["cancel"] = len(got) >= 3
    assert got[-1] == Finished(False, ["stopped"])
    assert no_children_left()


def test_a_child_that_ignores_cancel_is_killed_after_the_grace(monkeypatch):
    monkeypatch.setattr(analysis_process, "CANCEL_GRACE_SECONDS", 0.3)
    start = time.monotonic()
    got = list(analysis_process._child_stream(_ignores_cancel, (), lambda: True))
    assert time.monotonic() - start < 5
    assert got in ([], ["tick"])
    assert no_children_left()


def test_closing_the_stream_ends_the_child():
    stream = analysis_process._child_stream(_sends_then_sleeps, (), lambda: False)
    assert next(stream) == "first"
    stream.close()
    assert no_children_left()


def test_killed_mid_analysis_leaves_a_cache_that_finishes_the_same(checkpoints):
    """Each finished tensor is one SQLite commit: a child killed at any point leaves whole records only."""
    base, runs = paths(checkpoints)
    options = AnalysisOptions(rank=False, device="cpu")
    stream = analyse_in_child(base, runs, options)
    for event in stream:
        if isinstance(event, Progress):
            for child in multiprocessing.active_children():
                if child.name == "rlsub-analysis":
                    os.kill(child.pid, signal.SIGKILL)
            break
    stream.close()
    assert no_children_left()
    resumed = [e for e in analyse(base, runs, options) if isinstance(e, Progress)]
    fresh = [e for e in analyse(base, runs, AnalysisOptions(rank=False, device="cpu", use_cache=False))
             if isinstance(e, Progress)]
    assert {e.result.name: e.result.to_dict() for e in resumed} == {e.result.name: e.result.to_dict() for e in fresh}


def test_detail_in_child_equals_in_process(checkpoints):
    from rlsub_tui.compute.matrix_detail import detail, read_tensor

    base, runs = paths(checkpoints)
    options = AnalysisOptions(use_cache=False, rank=False, device="cpu")
    name = next(e for e in analyse(base, runs, options) if isinstance(e, Opened)).result.planned[0]
    there = detail_in_child(base, runs, options, name, (0, 1))
    here = detail(name, read_tensor(base, runs, options, name), options, (0, 1))
    assert there.name == here.name and there.shape == here.shape
    for field in ("cell_numel", "updated", "consensus", "log2_bins", "log2_counts", "zero"):
        np.testing.assert_array_equal(getattr(there, field), getattr(here, field))
    with pytest.raises(InputError, match="not compared"):
        detail_in_child(base, runs, options, "no.such.tensor", (0,))
    assert no_children_left()


CONSUMER = r"""
import json, sys
from rlsub_tui.records.events import TimelineDone
from rlsub_tui.analysis.child import analyse_in_child, detail_in_child
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.checkpoints.sample_paths import sample_checkpoints
from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs

if __name__ == "__main__":
    base, specs = sample_checkpoints()
    resolved = resolve_runs(specs)
    options = AnalysisOptions(use_cache=False, rank=False)
    kinds = [type(e).__name__ for e in analyse_in_child(base, run_specs(resolved), options, resolved.timelines)]
    d = detail_in_child(base, run_specs(resolved), options, "model.layers.0.mlp.up_proj.weight", (0, 1))
    print(json.dumps({"kinds": sorted(set(kinds)), "torch": "torch" in sys.modules, "detail": type(d).__name__}))
"""


def test_the_consumer_never_imports_torch(tmp_path):
    """In a fresh interpreter, as the explorer: the whole sample with its timelines and one tensor's detail
    arrive, and torch is never imported on this side (every event unpickles without it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RLSUB_TUI_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", CONSUMER], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    assert {"Opened", "Progress", "TimelineStep", "TimelineDone", "Finished"} <= set(got["kinds"])
    assert got["detail"] == "MatrixDetail"


def _cuda_state(send, cancelled):
    import torch

    send({"initialized": torch.cuda.is_initialized(), "bad_fork": torch.cuda._is_in_bad_fork()})


def test_the_forkserver_leaves_cuda_untouched_for_the_child():
    """The server imports torch and the engine but must not initialise CUDA: a child forked after that could
    not use the GPU (on a CPU-only build this holds trivially; on a GPU box it is the real check)."""
    (state,) = list(analysis_process._child_stream(_cuda_state, (), lambda: False))
    assert state == {"initialized": False, "bad_fork": False}


def test_a_cached_analysis_reopens_here_without_a_child(checkpoints, monkeypatch):
    base, runs = paths(checkpoints)
    options = AnalysisOptions(rank=False, device="cpu")
    first = list(analyse_in_child(base, runs, options))

    def no_child(*args):
        raise AssertionError("a child was started for a cached analysis")

    monkeypatch.setattr(analysis_process, "_child_stream", no_child)
    again = list(analyse_in_child(base, runs, options))
    assert [type(e) for e in again] == [type(e) for e in first] and again[-1].complete
    assert all(e.cached for e in again if isinstance(e, Progress))
