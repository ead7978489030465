"""Spectrum figures (stable, energy, effective rank) against numpy's SVD, on both rank routes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import numpy_rank

from rlsub_tui.compute.rank import update_rank, update_rank_figures
from rlsub_tui.records.spectrum import effective_rank, energy_rank, rank_figures, stable_rank


def numpy_figures(delta: torch.Tensor) -> dict:
    """The four figures straight from the definitions in science.md, on numpy's float64 SVD, over the
    singular values above PyTorch's default float32 rank tolerance (the ones the rank counts)."""
    d = delta.float().numpy()
    sigma = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    sigma = sigma[sigma > sigma[0] * max(d.shape) * np.finfo(np.float32).eps]
    energy = sigma ** 2
    cumulative = np.cumsum(energy) / energy.sum()
    p = sigma / sigma.sum()
    p = p[p > 0]
    return {
        "stable_rank": energy.sum() / sigma[0] ** 2,
        "energy_rank_90": int(np.argmax(cumulative >= 0.9)) + 1,
        "energy_rank_99": int(np.argmax(cumulative >= 0.99)) + 1,
        "effective_rank": math.exp(-np.sum(p * np.log(p))),
    }


def bf16_merge(shape, update: torch.Tensor, seed: int) -> torch.Tensor:
    """Δ as stored: bf16(w0 + update) - w0 for bf16 base weights w0."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return (w0.float() + update).to(torch.bfloat16) - w0


def low_rank(shape, r: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) * (scale / math.sqrt(r))


def test_hand_computed_spectrum():
    sq = np.array([9.0, 16.0, 0.0])  # sigma = 3, 4, 0
    assert stable_rank(sq) == pytest.approx(25 / 16)
    assert energy_rank(sq, 0.6) == 1  # 16 >= 15
    assert energy_rank(sq, 0.9) == 2  # 16 < 22.5 <= 25
    assert energy_rank(sq, 0.64) == 1  # exactly 16 >= 0.64 * 25 counts
    p = np.array([4 / 7, 3 / 7])
    assert effective_rank(sq) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    flat = rank_figures(5, np.ones(5))
    assert (flat.stable_rank, flat.energy_rank_90, flat.energy_rank_99) == (5.0, 5, 5)
    assert flat.effective_rank == pytest.approx(5.0)


def test_zero_update_has_zero_figures():
    f = update_rank_figures(torch.zeros(40, 30))
    assert (f.rank, f.stable_rank, f.energy_rank_90, f.energy_rank_99, f.effective_rank) == (0, 0.0, 0, 0, 0.0)
    f = update_rank_figures(torch.zeros(400, 30))
    assert (f.rank, f.stable_rank, f.energy_rank_90, f.energy_rank_99, f.effective_rank) == (0, 0.0, 0, 0, 0.0)


@pytest.mark.parametrize("shape", [(384, 256), (256, 384), (1024, 256), (256, 1024)])
def test_rank8_update_merged_into_bf16(shape):
    """bf16 rounding makes the default rank full; the energy ranks still see the 8 directions."""
    delta = bf16_merge(shape, low_rank(shape, 8, 1e-3, seed=sum(shape)), seed=1)
    f = update_rank_figures(delta)
    assert f.rank == min(shape) == int(torch.linalg.matrix_rank(delta.float()))
    assert 7 <= f.energy_rank_99 <= 9
    assert f.energy_rank_90 <= f.energy_rank_99
    assert f.stable_rank < 8
    expected = numpy_figures(delta)
    assert f.energy_rank_90 == expected["energy_rank_90"]
    assert f.energy_rank_99 == expected["energy_rank_99"]
    assert f.stable_rank == pytest.approx(expected["stable_rank"], rel=1e-4)
    assert f.effective_rank == pytest.approx(expected["effective_rank"], rel=1e-4)


@pytest.mark.parametrize("shape", [(384, 256), (256, 384), (1024, 256), (256, 1024)])
def test_full_rank_gaussian_update_has_energy_ranks_near_full(shape):
    g = torch.Generator().manual_seed(11)
    delta = bf16_merge(shape, torch.randn(shape, generator=g) * 1e-3, seed=2)
    f = update_rank_figures(delta)
    side = min(shape)
    assert f.rank == side
    assert f.energy_rank_99 >= 0.85 * side
    assert f.energy_rank_90 >= 0.55 * side  # a Gaussian spectrum (Marchenko-Pastur) is not flat
    assert f.effective_rank >= 0.85 * side
    expected = numpy_figures(delta)
    assert (f.energy_rank_90, f.energy_rank_99) == (expected["energy_rank_90"], expected["energy_rank_99"])
    assert f.stable_rank == pytest.approx(expected["stable_rank"], rel=1e-4)
    assert f.effective_rank == pytest.approx(expected["effective_rank"], rel=1e-4)


@pytest.mark.parametrize("shape,r", [((300, 300), 40), ((257, 300), 300), ((500, 260), 17), ((64, 96), 64)])
def test_svd_route_rank_equals_matrix_rank(shape, r):
    """Near-square CPU matrices take the svdvals route: the same count as matrix_rank, always."""
    assert max(shape) < 2 * min(shape)  # near-square (the svdvals route before the certified one)
    delta = bf16_merge(shape, low_rank(shape, r, 3e-4, seed=r), seed=3)
    assert update_rank(delta) == int(torch.linalg.matrix_rank(delta.float()))
    exact = low_rank(shape, r, 1.0, seed=r + 1)
    assert update_rank(exact) == int(torch.linalg.matrix_rank(exact)) == numpy_rank(exact.numpy())
    expected = numpy_figures(exact)
    f = update_rank_figures(exact)
    assert f.energy_rank_99 == expected["energy_rank_99"] <= r
    assert f.effective_rank == pytest.approx(expected["effective_rank"], rel=1e-4)


def test_svd_route_near_threshold_spectrum():
    """A near-square matrix with singular values on both sides of the tolerance."""
    g = torch.Generator().manual_seed(5)
    n = 200
    u, _ = torch.linalg.qr(torch.randn(n + 50, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    tol_rel = (n + 50) * torch.finfo(torch.float32).eps
    s = torch.ones(n, dtype=torch.float64)
    s[:37] = math.sqrt(2.0)  # energy 2 each: 37 * 2 + 63 * 1 = 137 in the top 100 values
    s[150:] = tol_rel * 1e-2
    s[100:150] = tol_rel * 1e2
    delta = ((u * s) @ v.T).float()
    assert update_rank(delta) == int(torch.linalg.matrix_rank(delta)) == 150
    f = update_rank_figures(delta)
    expected = numpy_figures(delta)
    # 90% of 137 = 123.3 <= 74 + 50 ones (k = 87); 99% = 135.63 <= 74 + 62 ones (k = 99)
    assert f.energy_rank_90 == expected["energy_rank_90"] == 87
    assert f.energy_rank_99 == expected["energy_rank_99"] == 99
    assert f.stable_rank == pytest.approx(68.5, rel=1e-4)


# --- through the engine, the exports and the cache ----------------------------------------------------

def _checkpoints(tmp_path, k=2):
    from synthetic import base_state, save, sparse_run

    b = base_state()
    runs = [sparse_run(b, s) for s in range(k)]
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    return b, runs, str(tmp_path / "base"), [str(tmp_path / f"run{i}") for i in range(k)]


def _analyze(base, runs, **kw):
    from rlsub_tui.compute.engine import Analysis
    from rlsub_tui.records.criteria import AnalysisOptions

    a = Analysis(base, runs, AnalysisOptions(**kw))
    a.run_all()
    a.close()
    return a.result


def test_engine_spectra_match_numpy_and_export(tmp_path):
    import csv

    import reference

    from rlsub_tui.export.outputs import write_outputs

    b, runs, base, run_paths = _checkpoints(tmp_path)
    result = _analyze(base, run_paths, use_cache=False)
    ratios = {f: [] for f in ("stable_rank", "energy_rank_90", "energy_rank_99", "effective_rank")}
    for name, tr in result.tensors.items():
        for i, s in enumerate(tr.runs):
            d = reference.stored_delta(b[name].float().numpy(), runs[i][name].float().numpy(), "bf16")
            if d.ndim != 2:
                assert (s.stable_rank, s.energy_rank_90, s.energy_rank_99, s.effective_rank) == (None,) * 4
                continue
            want = numpy_figures(torch.from_numpy(d))
            assert (s.energy_rank_90, s.energy_rank_99) == (want["energy_rank_90"], want["energy_rank_99"]), name
            assert s.stable_rank == pytest.approx(want["stable_rank"], rel=1e-4)
            assert s.effective_rank == pytest.approx(want["effective_rank"], rel=1e-4)
            for f in ratios:
                ratios[f].append(want[f] / min(d.shape))
    stats = result.stats()
    for f, values in ratios.items():
        assert stats.mean_spectrum_ratio(f) == pytest.approx(np.mean(values), rel=1e-4), f
    write_outputs(result, tmp_path / "out")
    with open(tmp_path / "out" / "matrices.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        s = result.tensors[row["tensor"]].runs[result.run_labels.index(row["run"])]
        if s.rank is None:
            assert row["energy_rank_99"] == row["stable_rank"] == ""
        else:
            assert int(row["energy_rank_99"]) == s.energy_rank_99
            assert float(row["effective_rank"]) == s.effective_rank
    with open(tmp_path / "out" / "groups.csv") as fh:
        model = [r for r in csv.DictReader(fh) if r["group"] == "model"]
    for i, row in enumerate(model):
        assert float(row["mean_energy_rank_99_ratio"]) == pytest.approx(stats.mean_spectrum_ratio("energy_rank_99", i))


def test_spectra_are_cached_with_the_rank(tmp_path, monkeypatch):
    import rlsub_tui.compute.subspace
    from rlsub_tui.records.criteria import Criterion

    _, _, base, run_paths = _checkpoints(tmp_path)
    first = _analyze(base, run_paths, cache_dir=tmp_path / "cache")

    def no_decomposition(delta, *_):
        raise AssertionError("the rank and its spectrum should come from the cache")

    # every rank is taken in compute/subspace.py (with the directions, or alone): none may run again; the
    # directions alone may (a cached rank is taken again with them)
    for taken in ("stacked_rank_figures", "rank_and_directions"):
        monkeypatch.setattr(rlsub_tui.compute.subspace, taken, no_decomposition)
    other = _analyze(base, run_paths, cache_dir=tmp_path / "cache", criterion=Criterion("exact"))
    for name, tr in first.tensors.items():
        assert [s.rank_figures() for s in other.tensors[name].runs] == [s.rank_figures() for s in tr.runs]
    assert any(s.energy_rank_99 for tr in other.tensors.values() for s in tr.runs)


def test_a_rank_cached_without_spectrum_is_recomputed(tmp_path):
    """A cache written before spectra existed holds bare ranks: they are not reused (no empty spectra)."""
    import sqlite3

    from rlsub_tui.compute.cache import APP_ID

    _, _, base, run_paths = _checkpoints(tmp_path, k=1)
    cache = tmp_path / "cache"
    cache.mkdir()
    fresh = _analyze(base, run_paths, use_cache=False)
    from rlsub_tui.compute.engine import Analysis
    from rlsub_tui.records.criteria import AnalysisOptions

    probe = Analysis(base, run_paths, AnalysisOptions(use_cache=False))
    pair = probe._pair_keys()[0]
    probe.close()
    conn = sqlite3.connect(cache / "results.sqlite")
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "CREATE TABLE ranks (pair TEXT NOT NULL, tensor TEXT NOT NULL, rank INTEGER NOT NULL,"
                       " PRIMARY KEY (pair, tensor));")
    conn.execute("INSERT INTO meta VALUES ('app', ?)", (APP_ID,))
    conn.executemany("INSERT INTO ranks VALUES (?, ?, ?)", [(pair, name, 1) for name in fresh.planned])  # wrong, bare
    conn.commit()
    conn.close()
    a = Analysis(base, run_paths, AnalysisOptions(cache_dir=cache))
    a.run_all()
    a.close()
    for name, tr in fresh.tensors.items():
        assert a.result.tensors[name].runs[0].rank_figures() == tr.runs[0].rank_figures()


@pytest.mark.parametrize("kind", ["bf16 sparse", "exact rank 8", "bf16 rank 8"])
def test_both_routes_give_the_same_figures(kind):
    """The Gram route (every shape on a GPU) and the SVD route (matrix_rank's own computation) agree on the
    figures: only singular values above the rank's tolerance enter them, so the routes' noise floors do not."""
    from rlsub_tui.compute.rank import _gram_route, _svd_route

    shape = (300, 260)
    g = torch.Generator().manual_seed(4)
    if kind == "bf16 sparse":
        update = torch.randn(shape, generator=g) * 3e-4 * (torch.rand(shape, generator=g) < 0.3)
        delta = bf16_merge(shape, update, seed=5)
    elif kind == "exact rank 8":
        delta = low_rank(shape, 8, 1.0, seed=6)
    else:
        delta = bf16_merge(shape, low_rank(shape, 8, 1e-3, seed=7), seed=8)
    by_svd, by_gram = rank_figures(*_svd_route(delta)), rank_figures(*_gram_route(delta))
    assert by_svd.rank == by_gram.rank == int(torch.linalg.matrix_rank(delta.float()))
    assert (by_svd.energy_rank_90, by_svd.energy_rank_99) == (by_gram.energy_rank_90, by_gram.energy_rank_99)
    assert by_svd.stable_rank == pytest.approx(by_gram.stable_rank, rel=1e-5)
    assert by_svd.effective_rank == pytest.approx(by_gram.effective_rank, rel=1e-5)
    if kind == "exact rank 8":
        assert by_svd.rank == 8 and by_svd.effective_rank <= 8


def test_energy_curve_against_numpy():
    from rlsub_tui.records.spectrum import CURVE_POINTS

    shape = (300, 260)
    delta = bf16_merge(shape, low_rank(shape, 8, 1e-3, seed=9), seed=10)
    f = update_rank_figures(delta)
    sigma = np.linalg.svd(delta.float().numpy().astype(np.float64), compute_uv=False)
    sigma = sigma[sigma > sigma[0] * max(shape) * np.finfo(np.float32).eps]
    cumulative = np.concatenate([[0.0], np.cumsum(sigma ** 2) / np.sum(sigma ** 2)])
    side = min(shape)
    want = [cumulative[min(math.ceil(j * side / CURVE_POINTS), sigma.size)] for j in range(CURVE_POINTS + 1)]
    assert len(f.energy_curve) == CURVE_POINTS + 1
    assert f.energy_curve == pytest.approx(want, abs=2e-6)
    assert f.energy_curve[0] == 0 and f.energy_curve[-1] == pytest.approx(1.0)
    assert list(f.energy_curve) == sorted(f.energy_curve)
    assert f.energy_curve[4] > 0.99  # 8 of 260 directions (x = 0.04 -> k = 11) hold the energy
    assert update_rank_figures(torch.zeros(20, 30)).energy_curve == ()


def test_spectrum_chart_for_a_matrix_and_a_group(tmp_path):
    from rlsub_tui.summaries.charts import spectrum_chart
    from rlsub_tui.summaries.tree import build_tree, find

    _, _, base, run_paths = _checkpoints(tmp_path)
    result = _analyze(base, run_paths, use_cache=False)
    roots = build_tree(list(result.planned))
    name = "model.layers.0.mlp.up_proj.weight"
    chart = spectrum_chart(find(roots, f"tensor:{name}"), result)
    assert chart.message is None and list(chart.series) == result.run_labels
    for label, s in zip(result.run_labels, result.tensors[name].runs):
        assert chart.series[label] == pytest.approx([100 * v for v in s.energy_curve])
    header, rows = chart.rows()
    assert header == ["k / min(m,n)"] + result.run_labels and len(rows) == 101
    layer = spectrum_chart(find(roots, "model.layers.0"), result)
    mats = [t for t in result.planned if t.startswith("model.layers.0.") and len(result.tensors[t].shape) == 2]
    mean = np.mean([result.tensors[t].runs[0].energy_curve for t in mats], axis=0)
    assert layer.series[result.run_labels[0]] == pytest.approx(list(100 * mean))
    norm = spectrum_chart(find(roots, "tensor:model.norm.weight"), result)
    assert norm.message and not norm.series


def test_a_rank_spectra_table_of_an_earlier_layout_is_rebuilt(tmp_path):
    import sqlite3

    from rlsub_tui.compute.cache import APP_ID, ResultCache
    from rlsub_tui.records.spectrum import RankFigures

    conn = sqlite3.connect(tmp_path / "results.sqlite")
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "CREATE TABLE rank_spectra (pair TEXT NOT NULL, tensor TEXT NOT NULL, rank INTEGER NOT NULL,"
                       " stable_rank REAL NOT NULL, energy_rank_90 INTEGER NOT NULL, energy_rank_99 INTEGER NOT NULL,"
                       " effective_rank REAL NOT NULL, PRIMARY KEY (pair, tensor));")
    conn.execute("INSERT INTO meta VALUES ('app', ?)", (APP_ID,))
    conn.execute("INSERT INTO rank_spectra VALUES ('p', 'w', 3, 1.5, 2, 3, 2.5)")
    conn.commit()
    conn.close()
    cache = ResultCache(tmp_path)
    assert cache.load_ranks("p") == {}  # the curve-less row is gone, not half-read
    figures = RankFigures(3, 1.5, 2, 3, 2.5, (0.0, 0.5, 1.0))
    cache.store_rank("p", "w", figures)
    assert cache.load_ranks("p") == {"w": figures}
    cache.close()
