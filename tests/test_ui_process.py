"""The explorer as the CLI runs it: the analysis and the detail views in a child process (compute="process").
Most UI tests compute in a thread, where the engine can be patched; these drive the real process mode."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from synthetic import broken_checkpoint

from rlsub_tui.analysis import child as analysis_process
from rlsub_tui.records.criteria import AnalysisOptions, Criterion
from rlsub_tui.records.results import MatrixDetail
from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
from rlsub_tui.ui.dialogs import CriterionDialog, ErrorDialog
from rlsub_tui.ui.tree import LayerTree


def make_app(root, runs=("seed0", "seed1"), **opts) -> ExplorerApp:
    opts.setdefault("device", "cpu")  # conftest's CPU-only patch does not reach a child process
    return ExplorerApp(ExplorerConfig(str(root / "base"), [str(root / r) for r in runs], AnalysisOptions(**opts),
                                      root / "exports", compute="process"))


def analysis_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name == "rlsub-analysis"]


async def settle(app, pilot):
    await app.workers.wait_for_complete()
    await pilot.pause(0.3)
    app._redraw_results()
    await pilot.pause()


async def test_opens_finishes_and_shows_a_tensors_map(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        assert app.result.complete and len(app.result.tensors) == len(app.result.planned)
        assert "complete" in str(app.query_one("#progress-text").render())
        name = "model.layers.1.mlp.up_proj.weight"
        tree = app.query_one(LayerTree)
        tree.select_node(next(n for n in _walk(tree.root) if n.data and n.data.key == f"tensor:{name}"))
        await pilot.press("8")  # after the analysis: the tensor is read in a child of its own
        for _ in range(200):
            await app.workers.wait_for_complete()
            await pilot.pause(0.05)
            if app.tensor_details:
                break
        (found,) = app.tensor_details.values()
        assert isinstance(found, MatrixDetail) and found.name == name and found.shape == (48, 32)
        await pilot.press("q")
    assert app.return_code == 0
    assert not analysis_children()


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


async def test_a_new_criterion_cancels_the_running_child_and_recomputes(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("c")  # at once, while the first analysis is starting or running
        assert isinstance(app.screen, CriterionDialog)
        box = app.screen.query_one("#tolerance")
        box.focus()
        box.value = ""
        await pilot.press(*"0.02", "enter")
        await settle(app, pilot)
        assert app.result.criterion == Criterion("atol", 0.02) and app.result.complete
        assert "atol 0.02" in app.sub_title
    assert not analysis_children()


async def test_bad_input_is_the_same_dialog(checkpoints):
    broken_checkpoint(checkpoints)
    app = make_app(checkpoints, runs=("seed0", "broken"))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert "broken/model.safetensors" in app.screen.message and "not valid JSON" in app.screen.message
        await pilot.press("enter", "q")
    assert app.return_code == 2
    assert not analysis_children()


async def started_child(pilot) -> list:
    """The analysis children, once one has started (up to 10 s)."""
    for _ in range(200):
        await pilot.pause(0.05)
        if analysis_children():
            break
    return analysis_children()


def _never_answers(send, cancelled, *args):  # run in the child instead of the analysis
    time.sleep(60)


async def test_a_killed_child_is_a_dialog_with_its_exit_code(checkpoints, monkeypatch):
    monkeypatch.setattr(analysis_process, "_analyse_target", _never_answers)
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        (child,) = await started_child(pilot)
        os.kill(child.pid, signal.SIGKILL)
        await settle(app, pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert "killed by SIGKILL" in app.screen.message and "exit code -9" in app.screen.message
        assert not app.running
    assert not analysis_children()


async def test_quitting_while_it_computes_leaves_no_child(checkpoints, monkeypatch):
    monkeypatch.setattr(analysis_process, "_analyse_target", _never_answers)
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        assert await started_child(pilot)
        await pilot.press("q")
    for _ in range(100):  # the worker ends its child once it sees the app's cancellation
        if not analysis_children():
            break
        time.sleep(0.05)
    assert not analysis_children()
