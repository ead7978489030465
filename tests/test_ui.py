"""Drive the real explorer with Textual's pilot, on small synthetic checkpoints."""

from __future__ import annotations

import csv
import re
import threading
from pathlib import Path

import pytest
from synthetic import base_state, broken_checkpoint, save, sparse_run

from rlsub_tui.records.criteria import AnalysisOptions, Criterion
from rlsub_tui.summaries import tables
from rlsub_tui.summaries import tree as explore
from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
from rlsub_tui.ui.chart import ChartPanel
from rlsub_tui.ui.dialogs import CriterionDialog, ErrorDialog, HelpScreen
from rlsub_tui.ui.messages import AnalysisOpened, TensorsComputed
from rlsub_tui.ui.table import ChildrenTable
from rlsub_tui.ui.tree import LayerTree


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
    import rlsub_tui.compute.engine as engine

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
        expected = tables.table_rows(app.roots[0], app.result)
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
                          ("0", "spectrum"), ("1", "depth")]:
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
        # exports hold fractions, as every other file (the chart itself plots percent)
        assert sum(float(r["observed"]) for r in rows) == pytest.approx(1.0)
        assert not list((checkpoints / "exports").glob("*.tmp"))
        await pilot.press("0", "x")  # the cumulative-energy curves of layer 0's matrices, one column per run
        rows = list(csv.DictReader(open(app.last_export)))
        assert "chart-spectrum" in app.last_export.name and len(rows) == 101
        assert float(rows[0]["seed0"]) == 0 and float(rows[-1]["seed0"]) == pytest.approx(1.0)  # fractions, as every export


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
    import rlsub_tui.compute.engine as engine

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
    broken_checkpoint(checkpoints)
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
    from rlsub_tui.checkpoints.preview import tensor_names

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
        # every tensor came from the cache, in one batch unless this machine stalled the worker over a
        # batch's time (BATCH_SECONDS) between two of them; the last batch completes the count
        assert batches and sum(len(b.results) for b in batches) == len(second.result.planned)
        assert batches[-1].done == batches[-1].total == len(second.result.planned)
        assert all(b.elapsed == 0.0 and b.bytes_done == 0 for b in batches)  # nothing was read or computed
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


# ------------------------------------------------------------------------------------------------
# Help, focus, small terminals, exits


def test_help_text_is_one_well_formed_markdown_table_per_block():
    from rlsub_tui.ui.dialogs import HELP

    lines = HELP.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|"):
            # a table row: either the table's first line (followed by the separator) or after another row
            starts = i + 1 < len(lines) and lines[i + 1].startswith("|---")
            assert starts or lines[i - 1].startswith("|"), f"row outside a table: {line}"
    assert "| done | tensors computed so far" in HELP
    assert "η = 1e-3 by default" in HELP
    assert "filled part (█) is the *updated* share" in HELP
    assert "numbered** 1..K in the order given" in HELP and "`i·j`" in HELP
    assert "Close this help with **esc**" in HELP


async def test_help_says_how_to_close_it_and_closes(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        # the session's runs, numbered as in the overlap chart's i·j, with their paths
        for i in range(3):
            assert f"- run {i + 1}: `seed{i}` {checkpoints / f'seed{i}'}" in app.screen.session
        assert "sweep: 1e-08, 1e-05" in app.screen.session
        hint = app.screen.query_one("#help-close")
        assert "esc" in str(hint.render()) and hint.region.bottom <= 24 and hint.region.height == 1
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_tab_switches_between_tree_and_table_only(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree, table = app.query_one(LayerTree), app.query_one(ChildrenTable)
        assert app.focused is tree
        await pilot.press("tab")
        assert app.focused is table
        await pilot.press("tab", "j")
        assert app.focused is tree and app.filter_text == ""
        await pilot.press("shift+tab")
        assert app.focused is table
        # in a dialog, tab still moves between its fields
        await pilot.press("c")
        first = app.focused
        await pilot.press("tab")
        assert isinstance(app.screen, CriterionDialog) and app.focused is not first


async def test_enter_on_a_table_row_opens_that_child(checkpoints):
    """Keyboard drill-down from the table: enter on a row makes that child the focused node, in the tree too
    (its ancestors expanded), whatever the table's sort order; the table then lists its children."""
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree, table = app.query_one(LayerTree), app.query_one(ChildrenTable)
        root = app.focus_node
        await pilot.press("tab", "s", "S")  # sort by name, Z to A: rows no longer in the children's order
        await pilot.pause()
        names = [r["name"] for r in table.rows_data]
        assert names == sorted(names, reverse=True) and names != [c.label for c in root.children]
        by_label = {c.label: c for c in root.children}
        row = next(i for i, n in enumerate(names) if i > 0 and by_label[n].children)  # a part, not a tensor
        await pilot.press(*["j"] * row, "enter")
        await pilot.pause()
        child = by_label[names[row]]
        assert app.focus_node is child and tree.cursor_node.data is child and app.focused is table
        assert [r["name"] for r in table.rows_data] == sorted((c.label for c in child.children), reverse=True)
        while app.focus_node.children:  # down to a tensor: its rows are runs, and enter opens nothing
            await pilot.press("enter")
            await pilot.pause()
        tensor = app.focus_node
        assert tensor.is_tensor and tree.cursor_node.data is tensor and tree.cursor_node.parent.is_expanded
        await pilot.press("enter")
        await pilot.pause()
        assert app.focus_node is tensor


async def test_filtered_root_says_what_it_pools(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"q_proj", "enter")
        tree = app.query_one(LayerTree)
        root_label = tree.get_node_at_line(0).data.label
        assert root_label == "base (filter 'q_proj': 2 of 21 tensors)"
        assert str(app.query_one("#table-title").render()).startswith("base (filter 'q_proj': 2 of 21 tensors)")
        await pilot.press("escape")
        assert tree.get_node_at_line(0).data.label == "base (21 tensors)"
        await pilot.pause()
        # after clearing, every column is as wide as its widest cell (nothing left cut)
        table = app.query_one(ChildrenTable)
        for key, col in table.columns.items():
            cells = [table.get_cell(rk, key) for rk in table.rows]
            widest = max([c.cell_len for c in cells] + [col.label.cell_len])
            assert col.get_render_width(table) >= widest + 2 * table.cell_padding, key


async def test_small_terminal_marks_clipped_values_and_keeps_dialogs_usable(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(60, 20)) as pilot:
        await settle(app, pilot)
        table = app.query_one(ChildrenTable)
        visible = table.scrollable_content_region.width
        assert table.virtual_size.width > visible  # more columns than fit
        for y in range(3):
            line = table.render_line(y).text
            assert line[visible - 1] == "…", line  # a cut line says so at the pane's edge
        tree = app.query_one(LayerTree)
        lines = [tree.render_line(y).text[:tree.scrollable_content_region.width] for y in range(4)]
        assert any(l.rstrip().endswith("…") for l in lines)  # "base (21 tensors)" does not fit
        await pilot.press("c")
        dialog = app.screen
        assert isinstance(dialog, CriterionDialog)
        for button_id in ("#apply", "#cancel"):
            region = dialog.query_one(button_id).region
            assert region.height >= 1 and region.bottom <= 20 and region.right <= 60, (button_id, region)
        await pilot.click("#cancel")
        assert not isinstance(app.screen, CriterionDialog)


async def test_80x24_names_are_abbreviated_from_the_left(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        table = app.query_one(ChildrenTable)
        first = table.get_row_at(0)
        name = str(first[0])  # cut from the left to the name column's width, which the layout sets
        assert name.startswith("…") and "model.embed_tokens.weight".endswith(name[1:]) and len(name) >= 16
        # four columns fit whole in the pane (name, params, sparsity, jacc); the cut fifth is marked
        widths = [c.get_render_width(table) for c in table.columns.values()]
        visible = table.scrollable_content_region.width
        assert sum(widths[:4]) <= visible < sum(widths[:5])
        assert table.render_line(1).text[visible - 1] == "…"


async def test_criterion_dialog_shows_the_sweep_as_a_value_or_plainly_off(checkpoints):
    app = make_app(checkpoints, sweep=(1e-8, 1e-7, 1e-6, 1e-5))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("c")
        assert app.screen.query_one("#sweep").value == "1e-08,1e-07,1e-06,1e-05"
    app = make_app(checkpoints, sweep=())
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        assert "no sweep" in app.sub_title
        await pilot.press("5")
        assert "no tolerance sweep" in app.query_one(ChartPanel).data.message
        await pilot.press("c")
        box = app.screen.query_one("#sweep")
        assert box.value == "" and box.placeholder.startswith("off")


def test_default_options_turn_the_papers_sweep_on():
    from rlsub_tui.cli.main import analysis_options, explore_parser

    assert analysis_options(explore_parser().parse_args([])).sweep == (1e-8, 1e-7, 1e-6, 1e-5)
    assert analysis_options(explore_parser().parse_args(["--sweep", "none"])).sweep == ()


async def test_failure_to_start_is_in_title_and_exit_status(checkpoints):
    broken_checkpoint(checkpoints)
    app = make_app(checkpoints, runs=("seed0", "broken"))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, ErrorDialog)
        await pilot.press("enter")
        assert "opening" not in app.sub_title and "could not open" in app.sub_title
        await pilot.press("q")
    assert app.return_code == 2
    ok = make_app(checkpoints)
    async with ok.run_test(size=(100, 30)) as pilot:
        await settle(ok, pilot)
        await pilot.press("q")
    assert ok.return_code == 0


async def test_another_architecture_is_a_plain_warning_in_the_explorer(tmp_path):
    from test_messages import tiny_transformers_model

    qwen = tiny_transformers_model("qwen2", 0, tmp_path / "qwen2")
    tiny_transformers_model("llama", 1, tmp_path / "llama")
    app = ExplorerApp(ExplorerConfig(str(qwen), [str(tmp_path / "llama")], AnalysisOptions(), tmp_path))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        errors = [n for n in app._notifications if n.severity == "error"]
        assert any("Qwen2ForCausalLM" in n.message and "LlamaForCausalLM" in n.message for n in errors)
        assert any("‖Δ‖/‖W0‖" in n.message for n in errors)


async def test_filter_typed_while_loading_then_cleared_leaves_the_whole_model(checkpoints, monkeypatch):
    import rlsub_tui.compute.engine as engine

    gate = threading.Event()
    real = engine.compute_tensor

    def gated(*a, **kw):
        gate.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(engine, "compute_tensor", gated)
    app = make_app(checkpoints, use_cache=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("slash", *"mlp")
        for _ in range(100):
            await pilot.pause(0.05)
            if app.result is not None:
                break
        tree = app.query_one(LayerTree)
        assert tree.get_node_at_line(0).data.label == "base (filter 'mlp': 6 of 21 tensors)"
        await pilot.press("escape")
        gate.set()
        await settle(app, pilot)
        assert app.filter_text == "" and tree.get_node_at_line(0).data.label == "base (21 tensors)"
        table = app.query_one(ChildrenTable)
        assert sum(r["numel"] for r in table.rows_data) == sum(app.result.planned_numel.values())


async def test_table_is_drawn_at_full_column_widths_at_once(checkpoints):
    """A frame drawn right after the table is refilled (before Textual's idle-time measuring) must not
    cut values to the column titles' widths; that frame used to stay until the cursor moved."""
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        table = app.query_one(ChildrenTable)
        app._show_focus()  # refill, and draw at once
        first = table.render_line(1).text
        assert "embed_tokens.weight" in first and re.search(r" 0\.\d{3} ", first), first  # jacc with 3 digits
        await pilot.pause(0.3)
        assert table.render_line(1).text == first
        for key, col in table.columns.items():  # every column as wide as its widest cell
            widest = max([table.get_cell(rk, key).cell_len for rk in table.rows] + [col.label.cell_len])
            assert col.get_render_width(table) >= widest + 2 * table.cell_padding, key


async def test_a_chart_with_nothing_to_draw_says_why_at_80x24(checkpoints):
    app = make_app(checkpoints, sweep=())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("5")
        await pilot.pause(0.3)
        screen = re.sub(r"<[^>]+>", "", app.export_screenshot()).replace("&#160;", " ")
        assert "no tolerance sweep: press c and give a" in screen  # wrapped inside the frame, not dropped
