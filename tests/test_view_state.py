"""The view state redraws itself (reactive focus, chart, metric, chosen runs); every multi-series chart keeps its
legend at 80x24; the tree's numbers line up whatever a row's expand state; snapshots of the charts at 80x24."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import base_state, save, sparse_run
from test_ui import make_app, settle

from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.summaries import tree as explore
from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
from rlsub_tui.ui.chart import ChartKey, ChartPanel, key_entries, key_line, series_color
from rlsub_tui.ui.dialogs import HelpScreen
from rlsub_tui.ui.table import ChildrenTable
from rlsub_tui.ui.tree import LayerTree

LONG = [f"grpo-{lr}-seed{i}" for lr in ("lowlr", "highlr") for i in (1, 2, 3)]  # six long labels, as users name runs


@pytest.fixture
def six_runs(tmp_path):
    b = base_state()
    save(b, tmp_path / "base")
    for s, label in enumerate(LONG):
        save(sparse_run(b, s), tmp_path / label)
    return tmp_path


def six_run_app(root: Path) -> ExplorerApp:
    return ExplorerApp(ExplorerConfig(str(root / "base"), [str(root / r) for r in LONG],
                                      AnalysisOptions(sweep=(1e-8, 1e-6, 1e-5), device="cpu"), root / "exports"))


# ------------------------------------------------------------------------------------------------
# The key line


def test_key_line_names_series_then_numbers_runs_when_names_do_not_fit():
    entries = [(label, series_color(i), i + 1) for i, label in enumerate(LONG)]
    wide = key_line(entries, 200)
    assert all(label in wide.plain for label in LONG)
    narrow = key_line(entries, 46)
    assert narrow.cell_len <= 46 and all(f"━━{i}" in narrow.plain for i in range(1, 7))
    assert "(?)" in narrow.plain  # says where the numbers are named
    # each swatch in its series' colour
    spans = [s for s in narrow.spans if "rgb" in str(s.style)]
    assert [str(s.style) for s in spans] == [f"rgb({c[0]},{c[1]},{c[2]})" for c in (series_color(i) for i in range(6))]
    # series that are not runs (observed, chance): cut to share the width, never dropped
    others = [("observed", series_color(0), None), ("chance", series_color(1), None),
              ("chance tensor×|w0| and a long tail", series_color(2), None)]
    cut = key_line(others, 40)
    assert cut.cell_len <= 40 and cut.plain.count("━━") == 3 and "observed" in cut.plain
    # a timeline's three series of one run: the run said once, the series by what differs
    timeline = [(f"grpo-lowlr-seed1 {what}", series_color(i), None)
                for i, what in enumerate(("vs base", "step", "union"))]
    line = key_line(timeline, 46)
    assert line.plain.startswith("grpo-lowlr-seed1: ") and line.cell_len <= 46
    assert all(what in line.plain for what in ("vs base", "step", "union"))


def test_key_line_groups_several_series_of_each_run_under_its_number():
    """A timeline of three runs (nine series) at a chart's width: each run's number once, one swatch per series
    in that series' own colour, and what the series are said once; all nine colours distinct."""
    runs = ["base-model", "grpo-lowlr-seed1", "grpo-lowlr-seed2", "grpo-lowlr-seed3"]
    labels = [f"{r} {what}" for r in runs[1:] for what in ("vs base", "200-step", "union")]
    entries = key_entries(labels, runs)
    assert [(e.run, e.kind) for e in entries[:3]] == [(2, "vs base"), (2, "200-step"), (2, "union")]
    assert len({e.color for e in entries}) == 9
    line = key_line(entries, 58)
    assert line.cell_len <= 58
    assert line.plain.startswith("2 ━━━  3 ━━━  4 ━━━") and "vs base, 200-step, union" in line.plain
    swatches = [s for s in line.spans if "rgb" in str(s.style)]
    assert [str(s.style) for s in swatches] == [f"rgb({c[0]},{c[1]},{c[2]})" for c in (e.color for e in entries)]
    narrow = key_line(entries, 44)  # a chart at 80 columns: the kinds still said, tersely
    assert narrow.cell_len <= 44 and narrow.plain.endswith("vs base/200-step/union")
    # wide enough: every series by its name
    assert all(label in key_line(entries, 400).plain for label in labels)
    # a run label that prefixes another's ('seed1' and 'seed1-long') belongs to the longest match
    assert key_entries(["seed1-long union"], ["seed1", "seed1-long"])[0][2:] == (2, "union")


async def test_every_multi_series_chart_keeps_its_legend_at_80x24(six_runs):
    app = six_run_app(six_runs)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        places = ["model", "model.layers.1", "tensor:model.layers.1.mlp.gate_proj.weight"]
        seen = set()
        for key in places:
            app.focus_node = explore.find(app.roots, key)
            for chart in ("depth", "agreement", "sweep", "magnitude", "spectrum"):
                app.chart_name = chart
                await pilot.pause()
                data = app.query_one(ChartPanel).data
                legend = app.query_one(ChartKey)
                if data.message or len(data.series) < 2:
                    assert not legend.display, (key, chart)
                    continue
                seen.add(chart)
                assert legend.display and legend.region.height == 1 and legend.region.bottom <= 24, (key, chart)
                shown = str(legend.render())
                assert len(legend.entries) == len(data.series)
                for label in data.series:  # by name, or by run number when names do not fit
                    number = LONG.index(label) + 1 if label in LONG else None
                    by_number = number is not None and f"━━{number}" in shown
                    assert label in shown or by_number or label[:3] in shown, (chart, label)
        assert seen == {"depth", "agreement", "sweep", "magnitude", "spectrum"}
        app.chart_name = "overlap"  # one series (the lift): no key line
        await pilot.pause()
        assert not app.query_one(ChartKey).display
        app.chart_name = "heatmap"
        await pilot.pause()
        assert not app.query_one(ChartKey).display


# ------------------------------------------------------------------------------------------------
# The tree


def _depth(node) -> int:
    d = 0
    while node.parent is not None:
        node, d = node.parent, d + 1
    return d


async def test_tree_numbers_line_up_whatever_the_expand_state(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        tree = app.query_one(LayerTree)
        tree.cursor_line = 2  # layer 0: expand it, so expanded, collapsed and leaf rows sit side by side
        await pilot.press("l")
        await pilot.pause()
        columns: dict[int, set[int]] = {}
        kinds: dict[int, set[str]] = {}
        for y in range(tree.last_line + 1):
            node = tree.get_node_at_line(y)
            text = tree.render_line(y).text
            columns.setdefault(_depth(node), set()).add(text.index("%"))
            kinds.setdefault(_depth(node), set()).add(
                "leaf" if not node.allow_expand else "open" if node.is_expanded else "closed")
        assert kinds[2] == {"leaf", "open", "closed"}  # the case the check is about is on screen
        assert kinds[3] >= {"leaf", "closed"}
        for depth, at in columns.items():
            assert len(at) == 1, f"depth {depth}: '%' at columns {sorted(at)}"


# ------------------------------------------------------------------------------------------------
# Reactive state


async def test_view_state_redraws_itself(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        chart, table = app.query_one(ChartPanel), app.query_one(ChildrenTable)
        app.chart_name = "agreement"  # set, nothing else called: the chart follows
        assert chart.data.name == "agreement"
        app.focus_node = explore.find(app.roots, "tensor:model.layers.0.mlp.up_proj.weight")
        assert [r["run"] for r in table.rows_data] == ["seed0", "seed1", "seed2"]
        assert str(app.query_one("#table-title").render()).startswith("up_proj.weight")
        app.chart_name = "overlap"
        app.overlap_metric = "jaccard"
        assert chart.data.ylabel == "jaccard" and "jaccard" in chart.data.series
        app.selected_runs = (0, 2)
        assert list(chart.data.x) == [0] and chart.data.xticks == ["1·3"]
        app.chart_name = "heatmap"
        app.heatmap_measure = "lift"
        assert app.query_one("#heatmap").measure == "lift"
        await pilot.press("o")  # a key sets the state; the watcher redraws: the lift over the stratified chance
        assert app.heatmap_measure == "lift_strat" and app.query_one("#heatmap").measure == "lift_strat"
        await pilot.press("o")  # then the subspace overlap
        assert app.heatmap_measure == "directions" and app.query_one("#heatmap").measure == "directions"
        await pilot.press("o")  # and round to o1
        assert app.heatmap_measure == "o1" and app.query_one("#heatmap").measure == "o1"


async def test_sorting_returns_to_the_given_order_and_help_lists_the_keys_bound(checkpoints):
    app = make_app(checkpoints)  # one session for both: each app start costs seconds
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        app.focus_node = explore.find(app.roots, "model.layers.0")
        table = app.query_one(ChildrenTable)
        given = [r["name"] for r in table.rows_data]
        for _ in range(len(table.columns_spec) + 1):  # every column, then back to no sort
            await pilot.press("s")
        assert [r["name"] for r in table.rows_data] == given
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        for b in ExplorerApp.BINDINGS:
            assert (b.tooltip or b.description).replace("|", "\\|") in app.screen.keys


# ------------------------------------------------------------------------------------------------
# Snapshots: six runs with long names at 80x24, where a legend is hardest to keep


def _focus_and_chart(key: str, chart: str):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        pilot.app.focus_node = explore.find(pilot.app.roots, key)
        pilot.app.chart_name = chart
        await pilot.pause(0.2)
    return ready


@pytest.mark.parametrize("key,chart", [("model", "depth"), ("model.layers.1", "agreement"),
                                       ("tensor:model.layers.1.mlp.gate_proj.weight", "magnitude")],
                         ids=["model-depth", "layer-agreement", "tensor-magnitude"])
def test_snapshot_six_runs_legend_80x24(six_runs, snap_compare, key, chart):
    assert snap_compare(six_run_app(six_runs), terminal_size=(80, 24), run_before=_focus_and_chart(key, chart))


@pytest.mark.parametrize("key,chart", [("model.layers.1", "sweep"),
                                       ("tensor:model.layers.1.self_attn.q_proj.weight", "spectrum")],
                         ids=["layer-sweep", "tensor-spectrum"])
def test_snapshot_six_runs_120x40(six_runs, snap_compare, key, chart):
    assert snap_compare(six_run_app(six_runs), terminal_size=(120, 40), run_before=_focus_and_chart(key, chart))


async def test_table_scrolls_sideways_to_the_columns_past_the_edge(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        app.focus_node = explore.find(app.roots, "tensor:model.layers.0.mlp.up_proj.weight")
        table = app.query_one(ChildrenTable)
        await pilot.press("tab")
        assert app.focused is table and table.scroll_x == 0
        assert table.virtual_size.width > table.scrollable_content_region.width  # more columns than fit
        await pilot.press("l", "l", "l")
        await pilot.pause(0.5)
        assert table.scroll_x > 0
