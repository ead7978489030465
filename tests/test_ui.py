"""Drive the real explorer with Textual's pilot, on small synthetic checkpoints."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import pytest

from synthetic import base_state, save, sparse_run
from rlsub_tui import explore
from rlsub_tui.engine import AnalysisOptions
from rlsub_tui.masks import Criterion
from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
from rlsub_tui.ui.chart import ChartPanel
from rlsub_tui.ui.dialogs import CriterionDialog, ErrorDialog, HelpScreen
from rlsub_tui.ui.messages import AnalysisOpened, TensorsComputed
from rlsub_tui.ui.table import ChildrenTable
from rlsub_tui.ui.tree import LayerTree


@pytest.fixture
def checkpoints(tmp_path):
    b = base_state()
    save(b, tmp_path / "base")
    for s in range(3):
        save(sparse_run(b, s), tmp_path / f"seed{s}")
    return tmp_path


def make_app(root: Path, runs=("seed0", "seed1", "seed2"), **opts) -> ExplorerApp:
    opts.setdefault("sweep", (1e-8, 1e-5))
    return ExplorerApp(ExplorerConfig(str(root / "base"), [str(root / r) for r in runs],
                                      AnalysisOptions(**opts), root / "exports"))


async def settle(app, pilot):
    await app.workers.wait_for_complete()
    await pilot.pause(0.3)
    app._redraw_results()
    await pilot.pause()


def visible_labels(tree: LayerTree) -> list[str]:
    return [tree.get_node_at_line(i).data.label for i in range(tree.last_line + 1)]


async def test_tree_first_then_values_arrive(checkpoints, monkeypatch):
    import rlsub_tui.engine as engine

    gate = threading.Event()
    real = engine.compute_tensor

    def gated(*a, **kw):
        gate.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(engine, "compute_tensor", gated)
    messages = []
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30), message_hook=messages.append) as pilot:
        for _ in range(50):
            await pilot.pause(0.05)
            if app.result is not None:
                break
        tree = app.query_one(LayerTree)
        # the tree is there from the headers, and no tensor has been computed yet
        assert app.result is not None and not app.result.tensors
        labels = visible_labels(tree)
        assert "layer 0" in labels and "layer 1" in labels
        assert not any(isinstance(m, TensorsComputed) for m in messages)
        gate.set()
        await settle(app, pilot)
        assert len(app.result.tensors) == len(app.result.planned)
        opened = next(i for i, m in enumerate(messages) if isinstance(m, AnalysisOpened))
        computed = next(i for i, m in enumerate(messages) if isinstance(m, TensorsComputed))
        assert opened < computed
        # the table holds the model's children with numbers equal to the core's
        table = app.query_one(ChildrenTable)
        expected = explore.table_rows(app.roots[0], app.result)
        assert [r["name"] for r in table.rows_data] == [r["name"] for r in expected]
        layer0 = next(r for r in table.rows_data if r["name"] == "layer 0")
        s = app.result.stats(explore.find(app.roots, "model.layers.0").tensors)
        assert layer0["sparsity:seed1"] == s.sparsity(1)
        assert "complete" in str(app.query_one("#progress-text").render())


async def test_navigation_keys(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree = app.query_one(LayerTree)
        assert app.focused is tree
        await pilot.press("g")
        assert tree.cursor_node.data.key == "model"
        await pilot.press("j")
        assert tree.cursor_node.data.label == "model.embed_tokens.weight"
        await pilot.press("j", "l")  # layer 0, expand
        assert tree.cursor_node.data.key == "model.layers.0" and tree.cursor_node.is_expanded
        assert app.focus_node.key == "model.layers.0"
        await pilot.press("l", "j")  # into the layer: first child, then the next
        assert tree.cursor_node.parent.data.key == "model.layers.0"
        await pilot.press("h")  # to the parent (a leaf cannot collapse)
        assert tree.cursor_node.data.key == "model.layers.0"
        await pilot.press("h")
        assert not tree.cursor_node.is_expanded
        await pilot.press("k")
        assert tree.cursor_node.data.label == "model.embed_tokens.weight"
        await pilot.press("enter")
        assert app.focus_node.is_tensor
        table = app.query_one(ChildrenTable)
        assert [r["run"] for r in table.rows_data] == ["seed0", "seed1", "seed2"]
        await pilot.press("G")
        assert tree.cursor_line == tree.last_line
        await pilot.press("tab")
        assert app.focused is table
        await pilot.press("j")
        assert table.cursor_row == min(1, table.row_count - 1)
        await pilot.press("G")
        assert table.cursor_row == table.row_count - 1


async def test_filter_keeps_matching_tensors(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("slash")
        await pilot.press(*"q_proj")
        await pilot.press("enter")
        tree = app.query_one(LayerTree)
        tensors = [n for r in explore.filter_tree(app.roots, "q_proj") for n in r.walk() if n.is_tensor]
        assert tensors and all("q_proj" in n.tensors[0] for n in tensors)
        labels = visible_labels(tree)
        assert "q_proj.weight" in labels and "k_proj.weight" not in labels
        await pilot.press("escape")
        assert "k_proj.weight" not in visible_labels(tree)  # collapsed again, but present:
        assert any(n.is_tensor and "k_proj" in n.tensors[0] for r in app.roots for n in r.walk())
        assert app.filter_text == ""


async def test_chart_switching(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        chart = app.query_one(ChartPanel)
        assert chart.data.name == "depth" and len(chart.data.x) == 2
        for key, name in [("2", "overlap"), ("3", "agreement"), ("4", "rank"), ("5", "sweep"), ("6", "magnitude"),
                          ("8", "spectrum"), ("1", "depth")]:
            await pilot.press(key)
            assert chart.data.name == name
        await pilot.press("bracketright")
        assert chart.data.name == "overlap" and chart.data.ylabel == "o1"
        await pilot.press("o")
        assert chart.data.ylabel == "jaccard"
        await pilot.press("bracketleft")
        assert chart.data.name == "depth"
        await pilot.press("3")
        total = sum(chart.data.series["observed"])
        assert total == pytest.approx(100.0)


async def test_export_table_and_chart(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("j", "j", "l")  # layer 0
        await pilot.press("e")
        path = app.last_export
        assert path is not None and path.parent == checkpoints / "exports" and "model.layers.0" in path.name
        rows = list(csv.DictReader(open(path)))
        table = app.query_one(ChildrenTable)
        assert len(rows) == len(table.rows_data) == 4  # two norms, self_attn, mlp
        for got, want in zip(rows, table.rows_data):
            assert got["name"] == want["name"]
            assert float(got["sparsity:seed0"]) == want["sparsity:seed0"]  # full precision
            assert int(got["numel"]) == want["numel"]
        await pilot.press("3", "x")
        chart_path = app.last_export
        assert chart_path != path and "chart-agreement" in chart_path.name
        rows = list(csv.DictReader(open(chart_path)))
        assert [int(r["j"]) for r in rows] == [0, 1, 2, 3]
        assert sum(float(r["observed"]) for r in rows) == pytest.approx(100.0)
        assert not list((checkpoints / "exports").glob("*.tmp"))
        await pilot.press("8", "x")  # the cumulative-energy curves of layer 0's matrices, one column per run
        rows = list(csv.DictReader(open(app.last_export)))
        assert "chart-spectrum" in app.last_export.name and len(rows) == 101
        assert float(rows[0]["seed0"]) == 0 and float(rows[-1]["seed0"]) == pytest.approx(100.0)


async def test_sort_by_column(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        table = app.query_one(ChildrenTable)
        await pilot.press("s")
        names = [r["name"] for r in table.rows_data]
        assert names == sorted(names)
        await pilot.press("s")
        sizes = [r["numel"] for r in table.rows_data]
        assert sizes == sorted(sizes, reverse=True)
        assert str(table.columns["numel"].label).endswith("▼")
        await pilot.press("S")
        assert [r["numel"] for r in table.rows_data] == sorted(sizes)


async def test_cancel_keeps_what_is_done(checkpoints, monkeypatch):
    import rlsub_tui.engine as engine

    real = engine.compute_tensor
    calls = {"n": 0}
    release = threading.Event()

    def slow(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            release.wait(5)
        return real(*a, **kw)

    monkeypatch.setattr(engine, "compute_tensor", slow)
    app = make_app(checkpoints, use_cache=False)
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(100):
            await pilot.pause(0.05)
            if calls["n"] > 3:
                break
        await pilot.press("escape")
        release.set()
        await settle(app, pilot)
        assert not app.running
        assert 0 < len(app.result.tensors) < len(app.result.planned)
        assert "cancelled" in str(app.query_one("#progress-text").render())


async def test_unreadable_run_shows_dialog_and_app_stays_usable(checkpoints):
    (checkpoints / "broken").mkdir()
    (checkpoints / "broken" / "model.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    app = make_app(checkpoints, runs=("seed0", "broken"))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert "broken/model.safetensors" in app.screen.message and "not valid JSON" in app.screen.message
        await pilot.press("enter")
        assert not isinstance(app.screen, ErrorDialog)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.is_running


async def test_change_criterion_recomputes(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        before = app.result.stats().sparsity(0)
        await pilot.press("c")
        assert isinstance(app.screen, CriterionDialog)
        box = app.screen.query_one("#tolerance")
        box.focus()
        box.value = ""
        await pilot.press(*"0.02", "enter")
        await settle(app, pilot)
        assert app.options.criterion == Criterion("atol", 0.02)
        assert app.result.criterion == Criterion("atol", 0.02)
        assert app.result.stats().sparsity(0) > before
        assert "atol 0.02" in app.sub_title


def test_snapshot_80x24(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        await pilot.press("j", "j", "l")
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(80, 24), run_before=ready)


def test_snapshot_120x40(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        await pilot.press("3")
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(120, 40), run_before=ready)


async def test_tree_preview_comes_before_torch_work(checkpoints):
    messages = []
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30), message_hook=messages.append) as pilot:
        await settle(app, pilot)
        kinds = [type(m).__name__ for m in messages if type(m).__name__ in ("TreePreview", "AnalysisOpened")]
        assert kinds[:2] == ["TreePreview", "AnalysisOpened"]
        preview = next(m for m in messages if type(m).__name__ == "TreePreview")
        assert sorted(preview.names) == sorted(app.result.planned)


def test_preview_names_per_layout(tmp_path):
    from rlsub_tui.preview import tensor_names

    b = base_state()
    for layout in ("safetensors", "sharded", "file"):
        path = save(b, tmp_path / layout, layout)
        assert sorted(tensor_names(str(path))) == sorted(b)
    save(b, tmp_path / "bin", "bin")
    assert tensor_names(str(tmp_path / "bin")) is None  # pickles wait for the real loader
    assert tensor_names(str(tmp_path / "missing")) is None
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    assert tensor_names(str(tmp_path / "junk.safetensors")) is None


async def test_second_open_comes_complete_from_cache(checkpoints):
    first = make_app(checkpoints)
    async with first.run_test(size=(100, 30)) as pilot:
        await settle(first, pilot)
        expected = first.result.stats().updated.tolist()
    messages = []
    second = make_app(checkpoints)
    async with second.run_test(size=(100, 30), message_hook=messages.append) as pilot:
        await settle(second, pilot)
        assert second.result.device.endswith("from cache")
        assert len(second.result.tensors) == len(second.result.planned)
        assert second.result.stats().updated.tolist() == expected
        batches = [m for m in messages if isinstance(m, TensorsComputed)]
        assert len(batches) == 1 and batches[0].done == batches[0].total
        assert "complete" in str(second.query_one("#progress-text").render())


async def test_skipped_tensors_are_named_in_the_ui(checkpoints):
    from rlsub_tui.ui.dialogs import WarningsScreen

    b = base_state()
    r = sparse_run(b, 5)
    del r["model.layers.1.mlp.up_proj.weight"]
    r["model.extra.weight"] = r["model.norm.weight"].clone()
    save(r, checkpoints / "odd")
    app = make_app(checkpoints, runs=("seed0", "odd"))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        toasts = [n.message for n in app._notifications]
        assert any("model.layers.1.mlp.up_proj.weight [odd]" in t and "press w" in t.lower() for t in toasts)
        await pilot.press("w")
        assert isinstance(app.screen, WarningsScreen)
        text = str(app.screen.query_one("#warnings-text").render())
        assert "model.layers.1.mlp.up_proj.weight [odd]: missing in this run" in text
        assert "model.extra.weight [odd]: only in this run, not in the base" in text
        await pilot.press("escape")
        assert not isinstance(app.screen, WarningsScreen)
