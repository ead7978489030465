"""Run groups: naming them, automatic prefixes, within against between, in the outputs and in the explorer."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
from synthetic import base_state, save, sparse_run
from test_glance_ui import numpy_masks
from test_selection import _records

from rlsub_tui.cli.main import main
from rlsub_tui.records.results import Stats
from rlsub_tui.summaries.groups import RunGroup, automatic_groups, block, named_groups, within_between
from rlsub_tui.util.errors import InputError

LABELS = ["grpo-lowlr-seed1", "grpo-lowlr-seed2", "grpo-lowlr-seed3", "grpo-highlr-seed1", "grpo-highlr-seed2",
          "sft"]


def test_automatic_groups_from_label_prefixes():
    groups = automatic_groups(LABELS)
    assert [(g.name, g.runs) for g in groups] == [("grpo-lowlr", (0, 1, 2)), ("grpo-highlr", (3, 4)), ("sft", (5,))]
    assert automatic_groups(["dpo_s42", "dpo_s123", "kto"])[0] == RunGroup("dpo", (0, 1))
    assert automatic_groups(["seed0", "seed1"]) == []  # nothing shared but the seed word: no groups
    assert automatic_groups(["a", "b"]) == []


def test_named_groups_and_their_errors():
    groups = named_groups([("low", "grpo-lowlr-*"), ("high", "grpo-highlr-*")], LABELS)
    assert [(g.name, g.runs) for g in groups] == [("low", (0, 1, 2)), ("high", (3, 4))]
    with pytest.raises(InputError, match="already in group low"):
        named_groups([("low", "grpo-lowlr-*"), ("rl", "grpo-*")], LABELS)
    with pytest.raises(InputError, match="matches no run"):
        named_groups([("dpo", "dpo-*")], LABELS)


def _pair_figures(m, pairs):
    o1 = [(m[a] & m[b]).sum() / m[a].sum() for x, y in pairs for a, b in ((x, y), (y, x))]
    rnd = [m[b].mean() for x, y in pairs for a, b in ((x, y), (y, x))]
    jac = [(m[a] & m[b]).sum() / (m[a] | m[b]).sum() for a, b in pairs]
    return np.mean(o1), np.mean(rnd), np.mean(jac)


def test_within_and_between_match_numpy():
    records, m = _records(5, seed=3)
    stats = Stats.of(records, 5)
    groups = [RunGroup("x", (0, 1, 2)), RunGroup("y", (3, 4))]
    within, between = within_between(stats, groups)
    inside = [(0, 1), (0, 2), (1, 2), (3, 4)]
    across = [(a, b) for a in (0, 1, 2) for b in (3, 4)]
    for fig, pairs in ((within, inside), (between, across)):
        o1, rnd, jac = _pair_figures(m, pairs)
        assert fig.pairs == len(pairs)
        assert (fig.o1, fig.o1_random, fig.jaccard) == pytest.approx((o1, rnd, jac))
        assert fig.lift("o1") == pytest.approx(o1 / rnd)
    xy = block(stats, groups[0], groups[1])
    assert xy.o1 == pytest.approx(between.o1)
    yy = block(stats, groups[1], groups[1])
    assert yy.pairs == 1 and yy.jaccard == pytest.approx(_pair_figures(m, [(3, 4)])[2])
    # restricted to chosen runs: run 2 out
    w2, _ = within_between(stats, groups, (0, 1, 3, 4))
    assert w2.o1 == pytest.approx(_pair_figures(m, [(0, 1), (3, 4)])[0])


@pytest.fixture
def grouped(tmp_path):
    b = base_state()
    save(b, tmp_path / "base")
    for name, seed in (("lowlr-seed1", 0), ("lowlr-seed2", 1), ("highlr-seed1", 2), ("highlr-seed2", 3)):
        save(sparse_run(b, seed, shared=0.8 if name.startswith("low") else 0.2), tmp_path / name)
    return tmp_path


RUNS4 = ("lowlr-seed1", "lowlr-seed2", "highlr-seed1", "highlr-seed2")


def test_analyze_writes_groups(grouped, capsys):
    out = grouped / "out"
    args = ["analyze", str(grouped / "base"), *(str(grouped / r) for r in RUNS4), "--out", str(out), "--quiet"]
    assert main(args) == 0
    pairs = list(csv.DictReader(open(out / "pairs.csv")))
    first = next(p for p in pairs if p["run_a"] == "lowlr-seed1" and p["run_b"] == "highlr-seed1")
    assert (first["group_a"], first["group_b"]) == ("lowlr", "highlr")
    summary = json.loads((out / "summary.json").read_text())
    g = summary["run_groups"]
    assert g["groups"] == [{"name": "lowlr", "runs": ["lowlr-seed1", "lowlr-seed2"]},
                           {"name": "highlr", "runs": ["highlr-seed1", "highlr-seed2"]}]
    m = numpy_masks(grouped, RUNS4)
    inside, across = [(0, 1), (2, 3)], [(a, b) for a in (0, 1) for b in (2, 3)]
    assert g["within"]["o1"] == pytest.approx(_pair_figures(m, inside)[0])
    assert g["between"]["o1"] == pytest.approx(_pair_figures(m, across)[0])
    assert g["within"]["pairs"] == 2 and g["between"]["pairs"] == 4
    low = next(b for b in g["blocks"] if b["group_a"] == b["group_b"] == "lowlr")
    assert low["jaccard"] == pytest.approx(_pair_figures(m, [(0, 1)])[2])
    assert summary["pairs"][0]["group_a"] == "lowlr"
    # named groups override; a bad one is refused before reading anything, with exit 2
    assert main(args + ["--group", "a=lowlr-*", "--group", "b=*-seed1"]) == 2
    assert "already in group a" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own refusal, as for every malformed option
        main(args[:1] + ["--group", "oops"] + args[1:])
    assert exc.value.code == 2 and "write NAME=GLOB" in capsys.readouterr().err


async def test_block_heatmap_in_the_explorer(grouped):
    from test_ui import settle

    from rlsub_tui.records.criteria import AnalysisOptions
    from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
    from rlsub_tui.ui.heatmap import HeatmapPanel
    from rlsub_tui.ui.summary import SummaryStrip

    app = ExplorerApp(ExplorerConfig(str(grouped / "base"), [str(grouped / r) for r in RUNS4],
                                     AnalysisOptions(), grouped / "exports"))
    m = numpy_masks(grouped, RUNS4)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert [g.name for g in app.groups] == ["lowlr", "highlr"]
        line = app.query_one(SummaryStrip).lines[-1]
        within = _pair_figures(m, [(0, 1), (2, 3)])[0]
        between = _pair_figures(m, list(itertools.product((0, 1), (2, 3))))[0]
        assert line.startswith(f"o1 within {within:.3f}".replace(" 0.", " ."))
        assert f"between {between:.3f}".replace(" 0.", " .") in line
        await pilot.press("7", "b")
        panel = app.query_one(HeatmapPanel)
        assert panel.names == ["lowlr (2)", "highlr (2)"]
        assert panel.grid[0][0].value == pytest.approx(_pair_figures(m, [(0, 1)])[0])
        assert panel.grid[0][1].value == pytest.approx(between)
        await pilot.press("x")
        rows = list(csv.DictReader(open(app.last_export)))
        assert "groups-o1" in app.last_export.name
        assert [(r["group_a"], r["group_b"], r["pairs"]) for r in rows] == [
            ("lowlr", "lowlr", "1"), ("lowlr", "highlr", "4"), ("highlr", "lowlr", "4"), ("highlr", "highlr", "1")]
        await pilot.press("b")
        assert panel.names == list(RUNS4)
