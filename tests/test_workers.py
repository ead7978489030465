"""Tensors computed in worker processes (`analyze --workers N`): the same records, in the same order, the
same sentences for bad input, and the parent's cache used as in one process."""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import replace
from concurrent.futures.process import BrokenProcessPool

import pytest

from rlsub_tui.cli import main
from rlsub_tui import engine
from rlsub_tui.engine import Analysis, AnalysisOptions
from rlsub_tui.errors import ComputeError, InputError
from rlsub_tui.workers import BLAS_THREAD_SETTERS, TensorWorkers


@pytest.fixture(autouse=True)
def pools(monkeypatch):
    """These models are tiny: let workers take them anyway (analyze uses them from WORKERS_MIN_BYTES up); the
    list of worker counts of the pools started, so a test can tell that its tensors went to workers."""
    monkeypatch.setattr(engine, "WORKERS_MIN_BYTES", 0)
    started = []
    real = TensorWorkers.__init__

    def spy(self, base, runs, options, workers):
        started.append(workers)
        real(self, base, runs, options, workers)

    monkeypatch.setattr(TensorWorkers, "__init__", spy)
    return started


def analysed(ckpts, workers: int, **options):
    runs = [str(ckpts / f"seed{s}") for s in range(3)]
    analysis = Analysis(str(ckpts / "base"), runs, AnalysisOptions(device="cpu", workers=workers, **options))
    try:
        return analysis, analysis.run_all()
    finally:
        analysis.close()


SUMMED_IN_BLAS = ("stable_rank", "effective_rank", "energy_curve")  # from eigenvalues: BLAS's threads sum in their order


def assert_same_records(got: dict, want: dict) -> None:
    """Equal records; a spectrum's float figures to 1e-12 (a worker's BLAS runs on fewer threads), its ranks exactly."""
    assert list(got) == list(want)
    for name, record in got.items():
        expected = want[name]
        for mine, theirs in zip(record.runs, expected.runs):
            for field in SUMMED_IN_BLAS:
                a, b = getattr(mine, field), getattr(theirs, field)
                assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-12, abs=1e-12)), (name, field)
        plain = [replace(r, **{f: None for f in SUMMED_IN_BLAS}) for r in record.runs]
        expected_plain = [replace(r, **{f: None for f in SUMMED_IN_BLAS}) for r in expected.runs]
        assert replace(record, runs=plain) == replace(expected, runs=expected_plain), name


@pytest.mark.parametrize("rank", [False, True])
def test_workers_give_the_same_records_in_order(checkpoints, rank, pools):
    one, alone = analysed(checkpoints, 1, use_cache=False, rank=rank, sweep=(1e-6, 1e-5))
    assert pools == []
    two, spread = analysed(checkpoints, 2, use_cache=False, rank=rank, sweep=(1e-6, 1e-5))
    assert pools == [2]
    assert alone.complete and spread.complete
    assert list(spread.tensors) == [p.name for p in two.plans] == list(alone.tensors)
    if rank:
        assert_same_records(spread.tensors, alone.tensors)
    else:
        assert spread.tensors == alone.tensors
    assert any(r.runs[0].rank is not None for r in spread.tensors.values()) == rank
    assert any(r.runs[0].stable_rank for r in spread.tensors.values()) == rank


def test_a_worker_limits_its_blas_threads():
    """numpy's OpenBLAS found and set in this process (Linux wheels): what workers side by side rely on."""
    import ctypes

    from rlsub_tui.workers import limit_blas_threads

    maps = [line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower() and "/" in line]
    assert limit_blas_threads(1)
    lib = ctypes.CDLL(maps[0])
    getter = next(getattr(lib, s.replace("set", "get")) for s in BLAS_THREAD_SETTERS if hasattr(lib, s))
    assert getter() == 1
    assert limit_blas_threads(os.cpu_count() or 1)
    assert getter() == (os.cpu_count() or 1)


def test_workers_fill_and_use_the_cache(checkpoints, tmp_path):
    cache = tmp_path / "cache"
    _, first = analysed(checkpoints, 2, cache_dir=cache)
    _, second = analysed(checkpoints, 2, cache_dir=cache)
    assert second.tensors == first.tensors
    _, alone = analysed(checkpoints, 1, use_cache=False)
    assert_same_records(first.tensors, alone.tensors)


def test_cancelled_between_tensors(checkpoints):
    runs = [str(checkpoints / f"seed{s}") for s in range(3)]
    analysis = Analysis(str(checkpoints / "base"), runs, AnalysisOptions(device="cpu", workers=2, use_cache=False))
    seen = []
    try:
        for progress in analysis.run(cancelled=lambda: len(seen) >= 2):
            seen.append(progress.result.name)
    finally:
        analysis.close()
    assert 2 <= len(seen) < len(analysis.plans)
    assert not analysis.result.complete
    assert seen == [p.name for p in analysis.plans[:len(seen)]]


def test_bad_input_met_in_a_worker_is_the_same_error(checkpoints, pools):
    """A run file cut short after the parent opened it: the worker's open refuses it, and the parent raises
    that InputError, naming the file (not a dead pool)."""
    runs = [str(checkpoints / f"seed{s}") for s in range(3)]
    analysis = Analysis(str(checkpoints / "base"), runs, AnalysisOptions(device="cpu", workers=2, use_cache=False))
    weights = checkpoints / "seed1" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 64)
    try:
        with pytest.raises(InputError, match="truncated") as caught:
            analysis.run_all()
    finally:
        analysis.close()
    assert str(weights) in str(caught.value)
    assert pools == [2]


def test_a_dead_worker_is_one_sentence():
    class Plan:
        name = "model.layers.0.mlp.up_proj.weight"

    died: Future = Future()
    died.set_exception(BrokenProcessPool("gone"))
    with pytest.raises(ComputeError, match=r"worker process died while comparing tensor 'model\.layers\.0\.mlp"):
        TensorWorkers._record(Plan, died)


def test_cli_workers_option(checkpoints, tmp_path, capsys, pools):
    args = ["analyze", str(checkpoints / "base"), str(checkpoints / "seed0"), "--no-cache", "--quiet", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert pools == [2]
    for name in ("matrices.csv", "pairs.csv", "agreement.csv", "groups.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "none"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rlsub-tui: error: --workers 0: must be 1 or more."
    assert not (tmp_path / "none").exists()


def test_small_models_are_computed_in_one_process(checkpoints, monkeypatch, pools):
    monkeypatch.setattr(engine, "WORKERS_MIN_BYTES", 1 << 30)
    _, result = analysed(checkpoints, 4, use_cache=False)
    assert result.complete and pools == []
