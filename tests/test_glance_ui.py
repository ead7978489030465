"""The summary strip, choosing runs and the overlap heatmap, driven through the real app; numbers against numpy."""

from __future__ import annotations

import csv
import itertools
import json
import re

import numpy as np
import pytest
from reference import mask
from safetensors.torch import load_file
from test_ui import make_app, settle

from rlsub_tui.ui.chart import ChartPanel
from rlsub_tui.ui.heatmap import HeatmapPanel
from rlsub_tui.ui.runs import RunChooser
from rlsub_tui.ui.summary import SummaryStrip

RUNS = ("seed0", "seed1", "seed2")


def numpy_masks(root, runs=RUNS):
    """Every run's update mask over the whole model (atol 1e-5 in bf16), from the files, with numpy."""
    base = load_file(str(root / "base" / "model.safetensors"))
    out = []
    for r in runs:
        state = load_file(str(root / r / "model.safetensors"))
        out.append(np.concatenate([mask(base[n].float().numpy(), state[n].float().numpy(), "bf16").reshape(-1)
                                   for n in sorted(base)]))
    return np.stack(out)


def numpy_strata(root) -> np.ndarray:
    """Each parameter's stratum (tensor × binary exponent of |w0|, zeros their own), in numpy_masks' order."""
    base = load_file(str(root / "base" / "model.safetensors"))
    parts = []
    for t, n in enumerate(sorted(base)):
        w = base[n].float().numpy().reshape(-1)
        _, e = np.frexp(np.abs(w))
        parts.append(t * 1000 + np.where(w == 0, 999, e + 300))
    return np.concatenate(parts)


def strat_expected(m: np.ndarray, strata: np.ndarray, a: int, b: int) -> float:
    """E = Σ_s a_s·b_s/n_s over the strata (the stratified null's expected |A∩B|)."""
    _, ids, n = np.unique(strata, return_inverse=True, return_counts=True)
    sa, sb = np.bincount(ids, weights=m[a]), np.bincount(ids, weights=m[b])
    return float(np.sum(sa * sb / n))


def expected_figures(m: np.ndarray, strata: np.ndarray) -> dict:
    """The strip's figures from numpy: mean o1, Jaccard, consensus with their chances and both lifts."""
    k, n = m.shape
    perm = list(itertools.permutations(range(k), 2))
    o1 = [(m[a] & m[b]).sum() / m[a].sum() for a, b in perm]
    o1_rnd = [m[b].mean() for a, b in perm]
    o1_str = [strat_expected(m, strata, a, b) / m[a].sum() for a, b in perm]
    jac, jac_rnd, jac_str = [], [], []
    for a, b in itertools.combinations(range(k), 2):
        jac.append((m[a] & m[b]).sum() / (m[a] | m[b]).sum())
        p, q = m[a].mean(), m[b].mean()
        jac_rnd.append(p * q / (p + q - p * q))
        e = strat_expected(m, strata, a, b)
        jac_str.append(e / (m[a].sum() + m[b].sum() - e))
    consensus = np.all(m, axis=0).mean()
    return {"o1": (np.mean(o1), np.mean(o1_rnd), np.mean(o1) / np.mean(o1_rnd), np.mean(o1) / np.mean(o1_str)),
            "jaccard": (np.mean(jac), np.mean(jac_rnd), np.mean(jac) / np.mean(jac_rnd),
                        np.mean(jac) / np.mean(jac_str)),
            "consensus": (100 * consensus, 100 * np.prod(m.mean(axis=1))),
            "sparsity": " ".join(f"{100 * (1 - m[i].mean()):.1f}" for i in range(k))}


FIGURE = re.compile(r"^(mean o1|Jaccard) (\S+)\s+chance (\S+)\s+(lift|strat) ([\d.]+)×(?: ·)? (lift|strat) ([\d.]+)×$")


def check_figure_line(line: str, name: str, want: tuple) -> None:
    """A strip line 'NAME obs  chance c  lift L · strat S' (either order, either width) against numpy."""
    found = FIGURE.match(line)
    assert found and found.group(1) == name, line
    observed, chance = float(found.group(2)), float(found.group(3))
    lifts = {found.group(4): float(found.group(5)), found.group(6): float(found.group(7))}
    assert observed == pytest.approx(want[0], abs=5e-4) and chance == pytest.approx(want[1], abs=5e-4), line
    assert lifts["lift"] == pytest.approx(want[2], abs=5e-3) and lifts["strat"] == pytest.approx(want[3], abs=5e-3)
    strat_first = abs(want[2] / want[3] - 1) > 0.10
    assert (found.group(4) == "strat") == strat_first, line  # the stratified lift leads when the two disagree


def check_consensus_line(line: str, k: int, want: tuple) -> None:
    found = re.match(rf"^all {k}(?: runs)? ([\d.]+)%\s+chance ([\d.]+)%\s", line)
    assert found, line
    assert float(found.group(1)) == pytest.approx(want[0], abs=5e-3)
    assert float(found.group(2)) == pytest.approx(want[1], abs=5e-3)


async def test_summary_strip_and_choosing_runs(checkpoints):
    m, strata = numpy_masks(checkpoints), numpy_strata(checkpoints)
    app = make_app(checkpoints)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        lines = app.query_one(SummaryStrip).lines
        want = expected_figures(m, strata)
        check_figure_line(lines[1], "mean o1", want["o1"])
        check_figure_line(lines[2], "Jaccard", want["jaccard"])
        check_consensus_line(lines[3], 3, want["consensus"])
        assert "strat" in lines[3]  # all runs chosen: the consensus has its stratified lift too
        assert [c.split(":")[1].rstrip("%") for c in lines[0].split()[-3:]] == want["sparsity"].split()
        assert " in bf16 " in lines[0] or lines[0].startswith("sp bf16")  # the dtype the figures are in
        flips = re.search(r"\(coin flips ([\d.]+)%\)", lines[4])
        hits = m.sum(axis=0)
        chance = sum((hits == j).sum() * 2.0 ** (1 - j) for j in range(2, 4)) / (hits >= 2).sum()
        assert lines[4].startswith("same sign") and float(flips.group(1)) == pytest.approx(100 * chance, abs=0.05)
        # drop seed1 in the run list: figures follow without recomputing
        computed = dict(app.result.tensors)
        await pilot.press("r")
        assert isinstance(app.screen, RunChooser)
        await pilot.press("down", "space", "enter")
        await pilot.pause()
        assert app.selected_runs == (0, 2)
        assert app.result.tensors == computed and not app.running
        lines = app.query_one(SummaryStrip).lines
        want = expected_figures(m[[0, 2]], strata)
        check_figure_line(lines[1], "mean o1", want["o1"])
        check_figure_line(lines[2], "Jaccard", want["jaccard"])
        check_consensus_line(lines[3], 2, want["consensus"])
        assert lines[4] == "same sign: recorded for all runs together only"
        await pilot.press("2")
        chart = app.query_one(ChartPanel).data
        assert chart.xticks == ["1·3"]
        assert chart.series["lift"][0] == pytest.approx(chart.series["o1"][0] / chart.series["o1_random"][0])
        assert chart.series["lift_strat"][0] == pytest.approx(chart.series["o1"][0] / chart.series["o1_random_strat"][0])
        await pilot.press("3")
        chart = app.query_one(ChartPanel).data
        hits = m[[0, 2]].sum(axis=0)
        assert chart.series["observed"] == pytest.approx([100 * np.mean(hits == j) for j in range(3)])
        await pilot.press("1")
        assert list(app.query_one(ChartPanel).data.series) == ["seed0", "seed2"]


async def test_runs_option_and_heatmap_export(checkpoints):
    m = numpy_masks(checkpoints)
    app = make_app(checkpoints)
    app.config.run_selection = "seed1,seed2"
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert app.selected_runs == (1, 2)
        await pilot.press("7")
        panel = app.query_one(HeatmapPanel)
        assert panel.display and not app.query_one(ChartPanel).display
        both = (m[1] & m[2]).sum()
        assert panel.grid[0][1].value == pytest.approx(both / m[1].sum())  # row seed1, column seed2: o1
        assert panel.grid[1][0].value == pytest.approx(both / m[2].sum())
        assert panel.grid[0][1].lift == pytest.approx(both / m[1].sum() / m[2].mean())
        await pilot.press("o")
        assert panel.measure == "jaccard"
        assert panel.grid[0][1].value == pytest.approx(both / (m[1] | m[2]).sum())
        await pilot.press("o")
        assert panel.measure == "lift"
        await pilot.press("x")
        rows = list(csv.DictReader(open(app.last_export)))
        assert "heatmap-lift" in app.last_export.name
        assert [(r["run_a"], r["run_b"]) for r in rows] == [("seed1", "seed2"), ("seed2", "seed1")]
        assert float(rows[0]["value"]) == pytest.approx(both / m[1].sum() / m[2].mean())
        strat = strat_expected(m, numpy_strata(checkpoints), 1, 2) / m[1].sum()  # o1's stratified chance, seed1 row
        assert float(rows[0]["observed"]) == pytest.approx(both / m[1].sum())
        assert float(rows[0]["chance"]) == pytest.approx(m[2].mean())  # no longer a constant 1.0
        assert float(rows[0]["chance_strat"]) == pytest.approx(strat)
        assert float(rows[0]["lift_strat"]) == pytest.approx(both / m[1].sum() / strat)
        meta = json.loads(app.last_export.with_suffix(".json").read_text())
        assert all(meta["columns"][c] for c in rows[0])  # every column defined in the sidecar
        assert [r["compare_dtype"] for r in meta["runs"]] == ["bf16"] * 3
        await pilot.press("o")
        assert panel.measure == "lift_strat"
        assert panel.grid[0][1].value == pytest.approx(both / m[1].sum() / strat)


async def test_bad_runs_selection_in_the_app_shows_a_dialog(checkpoints):
    from rlsub_tui.ui.dialogs import ErrorDialog

    app = make_app(checkpoints)
    app.config.run_selection = "nothing-*"
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, ErrorDialog) and "matches no run" in app.screen.message
        await pilot.press("enter")
        assert app.selected_runs == (0, 1, 2)


async def test_undefined_overlap_is_said_not_drawn(checkpoints):
    from synthetic import base_state, save

    b = base_state()
    save(b, checkpoints / "same1")
    save(b, checkpoints / "same2")
    app = make_app(checkpoints, runs=("same1", "same2"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        assert "undefined: no chosen run updated" in app.query_one(ChartPanel).data.message
        assert "undefined" in app.query_one(SummaryStrip).lines[1]


def test_snapshot_heatmap_80x24(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        await pilot.press("7")
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(80, 24), run_before=ready)


def test_snapshot_overlap_lift_120x40(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        await pilot.press("2")
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(120, 40), run_before=ready)


def test_snapshot_heatmap_120x40(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        await pilot.press("7", "o")
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(120, 40), run_before=ready)


def focus(app, key):
    from rlsub_tui.summaries import tree as explore

    app.focus_node = explore.find(app.roots, key)
    app._show_focus()


async def test_charts_follow_the_focus(checkpoints):
    from reference import numpy_rank, stored_delta

    base = load_file(str(checkpoints / "base" / "model.safetensors"))
    runs = [load_file(str(checkpoints / r / "model.safetensors")) for r in RUNS]
    app = make_app(checkpoints)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        focus(app, "tensor:model.layers.1.self_attn.q_proj.weight")
        await pilot.press("1")
        chart = app.query_one(ChartPanel).data
        assert chart.x == [0, 1] and chart.marked == 1 and "q_proj.weight" in chart.title
        for r, label in zip(runs, RUNS):
            want = [100 * (1 - mask(base[n].float().numpy(), r[n].float().numpy(), "bf16").mean())
                    for n in (f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1))]
            assert chart.series[label] == pytest.approx(want)
        await pilot.press("4")
        chart = app.query_one(ChartPanel).data
        assert chart.x == [0, 1] and chart.marked == 1
        for i in (0, 1):
            n = f"model.layers.{i}.self_attn.q_proj.weight"
            ranks = [numpy_rank(stored_delta(base[n].float().numpy(), r[n].float().numpy(), "bf16")) for r in runs]
            assert chart.series["rank ratio"][i] == pytest.approx(100 * np.mean(ranks) / 32)
        focus(app, "tensor:model.layers.0.input_layernorm.weight")
        assert app.query_one(ChartPanel).data.message.startswith("1-D tensors have no rank: move to")
        await pilot.press("1")
        focus(app, "tensor:model.embed_tokens.weight")
        assert "move to a layer or the model" in app.query_one(ChartPanel).data.message
        focus(app, "model.layers.0")  # a layer: every layer, this one marked
        chart = app.query_one(ChartPanel).data
        assert chart.x == [0, 1] and chart.marked == 0
        s1 = app.result.stats(explore_layer(app, 1)).sparsity(2)
        assert chart.series["seed2"][1] == pytest.approx(100 * s1)


def explore_layer(app, i):
    from rlsub_tui.summaries import tree as explore

    return explore.find(app.roots, f"model.layers.{i}").tensors


def test_snapshot_depth_on_a_tensor_80x24(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        focus(pilot.app, "tensor:model.layers.1.mlp.gate_proj.weight")
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(80, 24), run_before=ready)


def test_snapshot_rank_on_a_tensor_120x40(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        focus(pilot.app, "tensor:model.layers.0.mlp.gate_proj.weight")
        await pilot.press("4")
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(120, 40), run_before=ready)


async def wait_detail(app, pilot):
    for _ in range(100):
        await app.workers.wait_for_complete()
        await pilot.pause(0.05)
        if app.tensor_details:
            return
    raise AssertionError("the tensor's detail never arrived")


async def test_mask_map_and_delta_histogram_of_the_focused_tensor(checkpoints):
    from reference import stored_delta

    from rlsub_tui.compute.matrix_detail import LOG2_MIN
    from rlsub_tui.ui.maskmap import MaskMapPanel

    name = "model.layers.1.mlp.up_proj.weight"  # 48 x 32
    base = load_file(str(checkpoints / "base" / "model.safetensors"))[name].float().numpy()
    runs = [load_file(str(checkpoints / r / "model.safetensors"))[name].float().numpy() for r in RUNS]
    app = make_app(checkpoints)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("8")
        assert "move to a single tensor" in str(app.query_one(MaskMapPanel).render())
        focus(app, f"tensor:{name}")
        await wait_detail(app, pilot)
        app._show_focus()
        await pilot.pause()
        panel = app.query_one(MaskMapPanel)
        rows, cols = panel.fraction.shape
        assert rows == min(48, panel.map_size()[0]) and cols == 32
        masks = [mask(base, r, "bf16") for r in runs]
        r_cell = np.arange(48) * rows // 48
        want = np.zeros((rows, 32))
        np.add.at(want, (r_cell, slice(None)), np.all(masks, axis=0))
        np.testing.assert_allclose(panel.fraction, want / np.bincount(r_cell)[:, None])
        await pilot.press("m")  # one run at a time: the first chosen run
        np.add.at(want := np.zeros((rows, 32)), (r_cell, slice(None)), masks[0])
        np.testing.assert_allclose(panel.fraction, want / np.bincount(r_cell)[:, None])
        assert "seed0" in panel.title
        await pilot.press("9")
        chart = app.query_one(ChartPanel).data
        assert chart.name == "delta" and set(chart.series) == set(RUNS)
        d = np.abs(stored_delta(base, runs[1], "bf16"))
        counts = np.bincount(np.floor(np.log2(d[d > 0])).astype(int) - LOG2_MIN, minlength=60)
        got = dict(zip(chart.x, chart.series["seed1"]))
        for x, c in enumerate(counts):
            if c:
                assert got[x + LOG2_MIN] == pytest.approx(100 * c / d.size)
        assert chart.marked == pytest.approx(np.log2(1.00136e-5), abs=1e-4)
        await pilot.press("x")
        rows_csv = list(csv.DictReader(open(app.last_export)))
        assert rows_csv[0]["log2_abs_delta"] == "zero" and int(rows_csv[0]["seed1"]) == int((d == 0).sum())


def test_snapshot_mask_map_80x24(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        focus(pilot.app, "tensor:model.layers.1.mlp.down_proj.weight")
        await pilot.press("8")
        await wait_detail(pilot.app, pilot)
        pilot.app._show_focus()
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(80, 24), run_before=ready)


def test_snapshot_delta_histogram_120x40(checkpoints, snap_compare):
    async def ready(pilot):
        await settle(pilot.app, pilot)
        focus(pilot.app, "tensor:model.layers.1.mlp.down_proj.weight")
        await pilot.press("9")
        await wait_detail(pilot.app, pilot)
        pilot.app._show_focus()
        await pilot.pause(0.2)

    assert snap_compare(make_app(checkpoints, device="cpu"), terminal_size=(120, 40), run_before=ready)


async def test_tree_numbers_align_on_leaves_and_expandable_rows(checkpoints):
    from rlsub_tui.ui.tree import LayerTree

    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree = app.query_one(LayerTree)
        lines = ["".join(seg.text for seg in tree.render_line(y)) for y in range(tree.last_line + 1)]
        embed = next(line for line in lines if "model.embed_tokens" in line)  # a leaf
        layer = next(line for line in lines if "layer 0" in line)  # expandable, its sibling
        assert embed.index("%") == layer.index("%")


async def test_a_tensor_is_read_once_however_often_the_view_redraws(checkpoints, monkeypatch):
    import rlsub_tui.compute.matrix_detail as md

    calls = []
    real = md.read_tensor
    monkeypatch.setattr(md, "read_tensor", lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    app = make_app(checkpoints)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        focus(app, "tensor:model.layers.0.self_attn.o_proj.weight")
        await pilot.press("8")
        for _ in range(5):
            app._show_focus()
        await wait_detail(app, pilot)
        app._show_focus()
        await pilot.press("9", "8")
        await app.workers.wait_for_complete()
        assert calls == ["model.layers.0.self_attn.o_proj.weight"]


async def test_the_first_screen_at_80x24_keeps_five_table_rows_and_the_device(checkpoints):
    """A short screen: the strip keeps its most telling lines (sparsity, Jaccard with both lifts), the table at
    least its header and five rows, and the header the device; a tall one shows every strip line."""
    from rlsub_tui.ui.table import ChildrenTable

    app = make_app(checkpoints)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        lines = app.query_one(SummaryStrip).lines
        assert len(lines) <= 3 and lines[0].startswith("sp") and any(x.startswith("Jaccard") for x in lines)
        assert "strat" in next(x for x in lines if x.startswith("Jaccard"))
        assert app.query_one(ChildrenTable).scrollable_content_region.height >= 6
        assert app.title.startswith(f"rlsub-tui · {app.result.device}")
    app = make_app(checkpoints)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert len(app.query_one(SummaryStrip).lines) >= 5


async def test_a_chart_shown_again_keeps_its_title_and_wraps_its_message_as_a_sentence(checkpoints):
    """Back from the mask map (which hides the chart panel) the panel is drawn before it has its width again:
    the long spectrum title must still be shortened, not dropped, and a message wrapped at the real width."""
    app = make_app(checkpoints, device="cpu")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        panel = app.query_one(ChartPanel)
        await pilot.press("8", "0")
        await pilot.pause(0.3)
        assert len(panel.data.title) > panel.size.width - 12  # a title plotext would drop unshortened
        lines = [line.strip() for line in panel.render().plain.splitlines()]
        assert lines[0].startswith("cumulative energy of Δ's spectrum") and lines[0].endswith("…")
        await pilot.press("8", "9")
        await pilot.pause(0.3)
        text = panel.render().plain
        assert "move to a single tensor (a leaf of the" in text  # words side by side, not one a line
