"""Keys in the explorer as a person presses them: the filter box, enter in the tree, the criterion dialog, help."""

from __future__ import annotations

import re

from test_ui import make_app, settle, visible_labels
from textual import events
from textual.keys import _character_to_key
from textual.widgets import Markdown

from rlsub_tui.records.criteria import COMPARE_DTYPES, Criterion
from rlsub_tui.summaries import strip, tables
from rlsub_tui.summaries.selection import SelectedStats
from rlsub_tui.ui.chart import ChartPanel
from rlsub_tui.ui.dialogs import HELP, Choice, CriterionDialog, HelpScreen
from rlsub_tui.ui.filterbox import FilterBox
from rlsub_tui.ui.summary import SummaryStrip
from rlsub_tui.ui.table import ChildrenTable
from rlsub_tui.ui.tree import LayerTree


async def burst(app, pilot, keys: list[str]) -> None:
    """Keys as a terminal delivers a quick typist's (or a paste of) keys: all queued at once, none waited on."""
    for key in keys:
        name = _character_to_key(key) if len(key) == 1 and not key.isalnum() else key
        event = events.Key(name, key if len(key) == 1 else None)
        event.set_sender(app)
        app._driver.send_message(event)
    await pilot.pause(0.3)
    await pilot.pause()


def title(app) -> str:
    return str(app.query_one("#table-title").render())


def shown_for(app, node) -> tuple[list[str], list[str]]:
    """What the strip and the table would show for `node`: its summary lines and its table's names."""
    width = max(32, (app.query_one(SummaryStrip).size.width or 50) - 2)
    sel = SelectedStats(app.index.get(node), app.selected_runs or tuple(range(app.result.k)))
    columns, rows = tables.node_table(node, app.result, app.index)
    return strip.summary_lines(sel, width), [r[columns[0].key] for r in rows]  # a child's name, or a run's


# ------------------------------------------------------------------------------------------------
# The filter box


async def test_enter_in_the_filter_hands_the_following_keys_to_the_tree(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree, box = app.query_one(LayerTree), app.query_one(FilterBox)
        unfiltered = shown_for(app, app.roots[0])
        # keys typed before "/" move the tree as it was (here to layer 0: the filter must not leave the strip on it)
        await burst(app, pilot, ["g", "j", "j", "slash", *"q_proj", "enter"])
        assert app.focused is tree and box.value == app.filter_text == "q_proj"
        first = tree.get_node_at_line(0)
        assert tree.cursor_line == 0 and app.focus_node is first.data
        assert first.data.label == "base (filter 'q_proj': 2 of 21 tensors)"
        assert title(app).startswith(first.data.label)
        lines, names = shown_for(app, first.data)
        assert app.query_one(SummaryStrip).lines == lines != unfiltered[0]  # the matching tensors pooled
        assert [r["name"] for r in app.query_one(ChildrenTable).rows_data] == names
        assert names == ["layer 0", "layer 1"]  # the match's ancestors only
        # keys typed on, in the same burst as the enter, move the tree's cursor; none reach the box
        await burst(app, pilot, ["slash", "end", "backspace", "enter", "j", "j", "j"])  # editing keys too, in order
        assert box.value == app.filter_text == "q_pro" and app.focused is tree
        assert tree.cursor_line == 3 and app.focus_node is tree.get_node_at_line(3).data
        assert app.focus_node.is_tensor and title(app).startswith(app.focus_node.label)  # q_proj.weight of layer 0
        lines, names = shown_for(app, app.focus_node)
        assert app.query_one(SummaryStrip).lines == lines and names == ["seed0", "seed1", "seed2"]
        assert [r["run"] for r in app.query_one(ChildrenTable).rows_data] == names


async def test_a_filter_matching_nothing_says_so_everywhere_and_keeps_the_box(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        box = app.query_one(FilterBox)
        await pilot.press("slash", *"zzz", "enter")
        await pilot.pause()
        assert app.focus_node is None and app.query_one(LayerTree).last_line == -1
        assert title(app) == "no tensors match 'zzz'"
        assert app.query_one(SummaryStrip).lines[0] == "no tensors match 'zzz'"  # not the last node's numbers
        assert not re.search(r"\d:\d", " ".join(app.query_one(SummaryStrip).lines))
        assert app.query_one(ChildrenTable).rows_data == [] and app.query_one(ChildrenTable).row_count == 0
        assert "no tensors match 'zzz'" in app.query_one(ChartPanel).data.message
        assert any("zzz" in n.message and n.severity == "warning" for n in app._notifications)
        assert app.focused is box  # nothing to move through in the tree: the box stays, to edit the filter
        await pilot.press("backspace", "backspace", "backspace", *"mlp", "enter")
        assert app.focused is app.query_one(LayerTree) and app.focus_node.label.startswith("base (filter 'mlp'")


async def test_escape_in_the_filter_clears_it_and_returns_to_the_tree(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree, box = app.query_one(LayerTree), app.query_one(FilterBox)
        whole = visible_labels(tree)
        await burst(app, pilot, ["slash", *"mlp", "escape", "j"])
        assert box.value == app.filter_text == "" and app.focused is tree
        assert visible_labels(tree) == whole and tree.cursor_line == 1  # the j after esc moved the tree
        # esc in the tree with a filter on clears it too; without one it does not touch the tree
        await pilot.press("slash", *"mlp", "enter", "escape")
        assert app.filter_text == "" and visible_labels(tree) == whole and app.focused is tree


async def test_tab_and_shift_tab_never_land_in_the_filter_box(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        tree, table, box = app.query_one(LayerTree), app.query_one(ChildrenTable), app.query_one(FilterBox)
        assert box not in app.screen.focus_chain  # reached with "/" only, even while loading
        await settle(app, pilot)
        for keys in (["shift+tab"] * 5, ["tab"] * 5, ["slash", "shift+tab", "shift+tab", "shift+tab"],
                     ["slash", *"mlp", "tab", "shift+tab", "tab"]):
            for key in keys:
                await pilot.press(key)
                if key in ("tab", "shift+tab"):
                    assert app.focused in (tree, table), keys
        assert app.filter_text == "mlp"  # tab leaves the box with the filter as typed
        assert box not in app.screen.focus_chain
        for _ in range(4):  # Textual's own focus moves skip it too
            app.screen.focus_previous()
            assert app.focused is not box
        await pilot.press("slash")
        assert app.focused is box


# ------------------------------------------------------------------------------------------------
# enter in the tree


async def test_enter_on_the_root_keeps_the_tree_open(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree = app.query_one(LayerTree)
        whole = visible_labels(tree)
        await pilot.press("g", "enter")
        await pilot.pause()
        assert visible_labels(tree) == whole and tree.cursor_node.is_expanded
        assert app.focus_node is app.roots[0] and title(app).startswith("base (21 tensors)")
        await pilot.press("enter")
        await pilot.pause()
        assert visible_labels(tree) == whole
        # on any other node, enter still expands and collapses it
        await pilot.press("j", "j", "enter")  # layer 0
        await pilot.pause()
        assert tree.cursor_node.data.key == "model.layers.0" and tree.cursor_node.is_expanded
        assert app.focus_node.key == "model.layers.0" and len(visible_labels(tree)) > len(whole)
        await pilot.press("enter")
        await pilot.pause()
        assert not tree.cursor_node.is_expanded and visible_labels(tree) == whole
        # the other top-level node ("by type") opens with enter, and enter does not close it again
        await pilot.press("G")
        by_type = tree.cursor_node
        assert by_type.parent is tree.root and not by_type.is_expanded
        await pilot.press("enter", "enter")
        await pilot.pause()
        assert by_type.is_expanded and app.focus_node is by_type.data


# ------------------------------------------------------------------------------------------------
# The criterion dialog


def marks(dialog, set_id: str) -> dict[str, str]:
    """Each option of a set as drawn: its id -> its rendered text."""
    return {c.id: str(c.render()) for c in dialog.query_one(f"#{set_id}").query(Choice)}


async def test_the_chosen_option_is_marked_without_colour(checkpoints):
    app = make_app(checkpoints, criterion=Criterion("relative", 1e-3), compare_dtype="bf16")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("c")
        dialog = app.screen
        assert isinstance(dialog, CriterionDialog)
        drawn = marks(dialog, "criterion-set")
        assert drawn["relative"].startswith("(●)") and "●" not in drawn["atol"] + drawn["exact"]
        assert [c.id for c in dialog.query("#criterion-set Choice.-selected")] == ["relative"]  # highlighted too
        drawn = marks(dialog, "dtype-set")  # the running analysis' comparison dtype, preselected
        assert list(drawn) == [f"dtype-{d}" for d in COMPARE_DTYPES]
        assert drawn["dtype-bf16"].startswith("(●)") and sum("●" in t for t in drawn.values()) == 1
        bold = [c for c in dialog.query(Choice) if any("bold" in str(s.style) for s in c.render().spans)]
        assert {c.id for c in bold} == {"relative", "dtype-bf16"}
        screen = re.sub(r"<[^>]+>", "", app.export_screenshot()).replace("&#160;", " ")
        assert "(●) relative" in screen and "( ) atol" in screen and "(●) bf16" in screen
        # arrows choose as they move: the mark follows, so what is marked is what enter applies
        dialog.query_one("#criterion-set").focus()
        await pilot.press("up")
        drawn = marks(dialog, "criterion-set")
        assert drawn["exact"].startswith("(●)") and "●" not in drawn["relative"] + drawn["atol"]


async def test_enter_applies_the_dialog_from_any_field(checkpoints):
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        # from the criterion's option set, the keys sent at once as a terminal does
        await pilot.press("c")
        await burst(app, pilot, ["tab", "down", "enter"])  # into the set, atol -> exact, and apply
        assert not isinstance(app.screen, CriterionDialog)
        await settle(app, pilot)
        assert app.options.criterion.name == "exact" and app.result.criterion.name == "exact"
        # from the dialog as it opens (nothing chosen by the user yet) and from the sweep box
        for focus, expected in ((None, "exact"), ("#sweep", "exact")):
            await pilot.press("c")
            dialog = app.screen
            if focus:
                dialog.query_one(focus).focus()
                dialog.query_one(focus).value = "1e-6"
            await pilot.press("enter")
            assert not isinstance(app.screen, CriterionDialog), focus
            await settle(app, pilot)
            assert app.options.criterion.name == expected
        assert app.options.sweep == (1e-6,)
        # on the Cancel button enter presses it: nothing is recomputed
        generation = app.generation
        await pilot.press("c")
        app.screen.query_one("#cancel").focus()
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, CriterionDialog) and app.generation == generation


async def test_choosing_fp32_in_the_dialog_reruns_the_analysis_in_fp32(checkpoints, monkeypatch):
    import rlsub_tui.analysis.stream as stream

    real, runs = stream.analyse, []

    def recording(base, run_paths, options, *a, **kw):
        runs.append(options)
        return real(base, run_paths, options, *a, **kw)

    monkeypatch.setattr(stream, "analyse", recording)
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        assert [o.compare_dtype for o in runs] == ["stored"] and app.result.compare_dtype == "stored"
        await pilot.press("c")
        dialog = app.screen
        assert dialog.query_one("#dtype-set").pressed_button.id == "dtype-stored"
        dialog.query_one("#dtype-set").focus()
        await burst(app, pilot, ["right", "right"])  # stored -> bf16 -> fp16, sent at once
        assert dialog.query_one("#dtype-set").pressed_button.id == "dtype-fp16"
        await burst(app, pilot, ["right", "enter"])  # -> fp32, and enter, at once: enter applies fp32
        await settle(app, pilot)
        assert [o.compare_dtype for o in runs] == ["stored", "fp32"]
        assert runs[1].criterion == runs[0].criterion and runs[1].sweep == runs[0].sweep  # only the dtype changed
        assert app.options.compare_dtype == "fp32" and app.result.compare_dtype == "fp32"
        assert len(app.result.tensors) == len(app.result.planned)
        assert "compared in fp32" in app.sub_title
        assert {s.dtype for t in app.result.tensors.values() for s in t.runs} == {"fp32"}
        await pilot.press("c")  # the dialog opens on the dtype now running
        assert app.screen.query_one("#dtype-set").pressed_button.id == "dtype-fp32"


# ------------------------------------------------------------------------------------------------
# Help


async def test_help_explains_patch_dense_and_lists_the_filter_keys(checkpoints):
    paragraphs = [p for p in HELP.split("\n\n") if "patch/dense" in p]
    assert len(paragraphs) == 1
    sentence = paragraphs[0]
    assert "lossless sparse patch" in sentence and "over the dense tensor's bytes" in sentence
    assert "above 100%" in sentence and "index plus the new stored value" in sentence
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        shown = app.screen.query_one(Markdown).source
        assert sentence in shown
        assert "| enter | filter box | Apply the filter" in shown and "| esc | filter box | Clear the filter" in shown
