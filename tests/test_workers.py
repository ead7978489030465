"""Tensors computed in worker processes (`analyze --workers N`): the same records, in the same order, the
same sentences for bad input, and the parent's cache used as in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from rlsub_tui.cli.main import main
from rlsub_tui.compute import engine, workers
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.compute.workers import BLAS_THREAD_SETTERS, TensorWorkers
from rlsub_tui.records.criteria import AnalysisOptions, Criterion
from rlsub_tui.util.errors import ComputeError, InputError


@pytest.fixture(autouse=True)
def pools(monkeypatch):
    """These models are tiny: let workers take them anyway (analyze uses them from WORKERS_MIN_BYTES up), each
    tensor a task of its own as a large model's large tensors are; the list of the pools started, so a test can
    tell that its tensors went to workers, and reach them."""
    monkeypatch.setattr(engine, "WORKERS_MIN_BYTES", 0)
    monkeypatch.setattr(workers, "BATCH_BYTES", 0)
    started = []
    real = TensorWorkers.__init__

    def spy(self, *args):
        started.append(self)
        real(self, *args)

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
    assert [p.workers for p in pools] == [2]
    assert alone.complete and spread.complete
    assert list(spread.tensors) == [p.name for p in two.plans] == list(alone.tensors)
    if rank:
        assert_same_records(spread.tensors, alone.tensors)
    else:
        assert spread.tensors == alone.tensors
    assert any(r.runs[0].rank is not None for r in spread.tensors.values()) == rank
    assert any(r.runs[0].stable_rank for r in spread.tensors.values()) == rank


def test_small_tensors_go_to_workers_in_batches(checkpoints, monkeypatch):
    """Consecutive small tensors sent together: the same records, in order, as in one process, and a cancel
    still stops between tensors of a batch."""
    opened = Analysis(str(checkpoints / "base"), [str(checkpoints / "seed0")], AnalysisOptions(device="cpu"))
    plans = opened.plans
    opened.close()
    monkeypatch.setattr(workers, "BATCH_BYTES", sum(p.nbytes for p in plans) // 3)
    cut = workers.batches(plans)
    assert 2 <= len(cut) < len(plans) and any(len(b) > 1 for b in cut)
    _, alone = analysed(checkpoints, 1, use_cache=False, rank=False)
    _, batched = analysed(checkpoints, 2, use_cache=False, rank=False)
    assert batched.tensors == alone.tensors and list(batched.tensors) == list(alone.tensors)
    test_cancelled_between_tensors(checkpoints)


def test_batches_keep_order_and_bounds(monkeypatch):
    monkeypatch.setattr(workers, "BATCH_BYTES", 100)
    plans = [engine.TensorPlan(f"t{i}", [], None, (n,), None, n, [], [], []) for i, n in
             enumerate([30, 30, 30, 30, 250, 10, 100, 99, 1, 1])]
    cut = workers.batches(plans)
    assert [p for b in cut for p in b] == plans
    assert [[p.nbytes for p in b] for b in cut] == [[30, 30, 30], [30], [250], [10], [100], [99, 1], [1]]
    assert [workers.largest(b).nbytes for b in cut] == [30, 30, 250, 10, 100, 99, 1]


class InlinePool:
    """An executor that runs each task at once, here: TensorWorkers.computed's logic without processes."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def test_an_error_inside_a_batch_comes_after_the_records_before_it(monkeypatch):
    """A tensor that fails in a batch: the ones before it still reach the parent (progress, cache), then its
    error, with the worker's traceback as the cause; nothing after it."""
    def fake(name, known):
        if name == "bad":
            raise InputError("tensor 'bad' is no longer in the checkpoints: a file changed during the analysis.")
        return f"record {name}"

    monkeypatch.setattr(workers, "_compute", fake)
    monkeypatch.setattr(workers, "BATCH_BYTES", 100)
    plans = [engine.TensorPlan(n, [], None, (1,), None, 10, [], [], []) for n in ("a", "b", "bad", "c")]
    pool = TensorWorkers.__new__(TensorWorkers)
    pool.workers, pool.pool = 2, InlinePool()
    got = []
    with pytest.raises(InputError, match="'bad' is no longer") as caught:
        for plan, record in pool.computed(plans, lambda p: [None], lambda: False):
            got.append((plan.name, record))
    assert got == [("a", "record a"), ("b", "record b")]
    assert isinstance(caught.value.__cause__, workers.WorkerTraceback) and "fake" in str(caught.value.__cause__)


def test_a_dead_worker_is_named_by_the_largest_tensor_of_each_batch_in_flight():
    small = [engine.TensorPlan(f"norm{i}", [], None, (1,), None, 10, [], [], []) for i in range(20)]
    big = engine.TensorPlan("mlp.up_proj", [], None, (1,), None, 10 << 20, [], [], [])
    bigger = engine.TensorPlan("embed_tokens", [], None, (1,), None, 100 << 20, [], [], [])
    message = str(TensorWorkers._died([small, [bigger], [big]]))
    assert message.startswith("a worker process died (out of memory?) while these tensors were being compared: "
                              "'embed_tokens', 'mlp.up_proj', 'norm0'; try fewer --workers")


def test_a_worker_limits_its_blas_threads():
    """numpy's OpenBLAS found and set in this process (Linux wheels): what workers side by side rely on."""
    import ctypes

    from rlsub_tui.compute.workers import limit_blas_threads

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
    assert [p.workers for p in pools] == [2]


def test_a_killed_worker_is_one_sentence(checkpoints, pools):
    """Workers killed (as the OOM killer would) after the first record: the next record raises one sentence
    naming the tensors in flight, and nothing is left running."""
    runs = [str(checkpoints / f"seed{s}") for s in range(3)]
    analysis = Analysis(str(checkpoints / "base"), runs, AnalysisOptions(device="cpu", workers=2, use_cache=False))
    seen, killed = [], []

    def kill_once() -> bool:
        if seen and not killed:
            killed.extend(pools[0].pool._processes)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        return False

    try:
        with pytest.raises(ComputeError) as caught:
            for progress in analysis.run(cancelled=kill_once):
                seen.append(progress.result.name)
    finally:
        analysis.close()
    assert killed and len(seen) < len(analysis.plans)
    assert str(caught.value).startswith("a worker process died (out of memory?) while these tensors were being compared: '")
    assert "--workers 1" in str(caught.value)
    assert all(gone(pid) for pid in killed)


def gone(pid: int, within: float = 10.0) -> bool:
    """The process has exited (a zombie counts: nobody may be left to reap it in a container)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_workers_end_when_the_analyze_process_is_killed(checkpoints):
    """SIGKILL to the analyze process alone: its workers (children of the forkserver, not of it) notice and exit."""
    script = f"""
import json, sys
sys.path[:0] = {sys.path!r}
from rlsub_tui.records.criteria import Criterion
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.compute.workers import TensorWorkers, thread_counts
if __name__ == "__main__":
    a = Analysis({str(checkpoints / "base")!r}, [{str(checkpoints / "seed0")!r}], AnalysisOptions(device="cpu", use_cache=False, workers=2))
    pool = TensorWorkers(type(a), *a.given, a.options, 2, a.fingerprints())
    futures = [pool.pool.submit(thread_counts) for _ in range(4)]
    [f.result() for f in futures]
    print(json.dumps(list(pool.pool._processes)), flush=True)
    import time
    time.sleep(60)
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(child.stdout.readline())
        assert pids and not any(gone(pid, within=0.0) for pid in pids)
    finally:
        child.kill()
        child.wait()
    assert all(gone(pid) for pid in pids)


def test_each_worker_gets_its_share_of_threads(checkpoints, pools):
    from rlsub_tui.compute.workers import cores, thread_counts

    runs = [str(checkpoints / "seed0")]
    analysis = Analysis(str(checkpoints / "base"), runs, AnalysisOptions(device="cpu", workers=2, use_cache=False))
    pool = TensorWorkers(type(analysis), *analysis.given, analysis.options, 2, analysis.fingerprints())
    try:
        torch_threads, blas = pool.pool.submit(thread_counts).result()
    finally:
        pool.close()
        analysis.close()
    share = max(1, cores() // 2)
    assert torch_threads == share and blas and set(blas) == {share}


def test_workers_inherit_objects_frozen_out_of_the_collector(checkpoints, pools):
    """The forkserver froze what its imports made (forkserver_preload): a worker's collections leave those
    inherited pages shared instead of copying them."""
    import gc

    analysis = Analysis(str(checkpoints / "base"), [str(checkpoints / "seed0")],
                        AnalysisOptions(device="cpu", workers=2, use_cache=False))
    pool = TensorWorkers(type(analysis), *analysis.given, analysis.options, 2, analysis.fingerprints())
    try:
        frozen = pool.pool.submit(gc.get_freeze_count).result()
    finally:
        pool.close()
        analysis.close()
    assert frozen > 10_000  # torch's and the engine's objects (about 10^5 here), not a handful


def test_cached_ranks_reach_the_workers(checkpoints, tmp_path, pools):
    """Ranks the cache holds are handed to the workers and not recomputed: planted ones come back as planted."""
    from rlsub_tui.compute.cache import ResultCache
    from rlsub_tui.records.spectrum import RankFigures

    cache = tmp_path / "cache"
    first, _ = analysed(checkpoints, 2, cache_dir=cache)
    planted = RankFigures(12345, 1.5, 2, 3, 4.5, (0.0, 1.0))
    store = ResultCache(cache)
    for key in first._pair_keys():
        for tensor in store.load_ranks(key):
            store.store_rank(key, tensor, planted)
    store.close()
    # another tolerance: every count is computed again (in workers), every rank comes from the cache
    _, again = analysed(checkpoints, 2, cache_dir=cache, criterion=Criterion("atol", 1e-6))
    assert len(pools) == 2
    ranked = [s for r in again.tensors.values() for s in r.runs if s.rank is not None]
    assert ranked and all(s.rank == 12345 and s.effective_rank == 4.5 for s in ranked)
    assert any(r.subspaces for r in again.tensors.values())  # the directions still come, the rank stays cached


def test_a_checkpoint_changed_after_opening_is_refused(checkpoints, pools):
    runs = [str(checkpoints / f"seed{s}") for s in range(3)]
    analysis = Analysis(str(checkpoints / "base"), runs, AnalysisOptions(device="cpu", workers=2, use_cache=False))
    weights = checkpoints / "seed2" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    try:
        with pytest.raises(InputError, match="changed while it was being analyzed") as caught:
            analysis.run_all()
    finally:
        analysis.close()
    assert str(checkpoints / "seed2") in str(caught.value)


def test_cli_workers_option(checkpoints, tmp_path, capsys, pools):
    args = ["analyze", str(checkpoints / "base"), str(checkpoints / "seed0"), "--no-cache", "--quiet", "--device", "cpu",
            "--no-rank"]  # with rank, a spectrum's last digits may differ (see assert_same_records)
    assert main(args + ["--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert [p.workers for p in pools] == [2]
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


def session_processes(sid: int) -> list[int]:
    """Live processes of a session (zombies left out)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                pids.append(int(d))
    return pids


def test_ctrl_c_with_workers_running(checkpoints, tmp_path):
    """Ctrl-C (SIGINT to the whole process group) while workers compute: exit 130 with the one sentence, no
    traceback from the parent, the forkserver or a worker, nothing written, and no process left behind.
    (A Ctrl-C while the forkserver imports torch, or while a worker starts, printed tracebacks before
    start_server ignored it and submit deferred it; those moments are too short to hit here on purpose.)"""
    out = tmp_path / "out"
    script = f"""
import sys, time
sys.path[:0] = {sys.path!r}
from rlsub_tui.compute import engine
from rlsub_tui.compute import workers
from rlsub_tui.cli.main import main
engine.WORKERS_MIN_BYTES = 0
real = workers.TensorWorkers.computed
def slowed(self, *args):
    for item in real(self, *args):
        yield item
        print("computing", flush=True)
        time.sleep(60)
workers.TensorWorkers.computed = slowed
if __name__ == "__main__":
    raise SystemExit(main(["analyze", {str(checkpoints / "base")!r}, {str(checkpoints / "seed0")!r},
                           {str(checkpoints / "seed1")!r}, "--out", {str(out)!r}, "--no-cache", "--quiet",
                           "--device", "cpu", "--workers", "2"]))
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "computing"
        assert len(session_processes(child.pid)) >= 3  # analyze, the forkserver, a worker
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130
    assert err.strip() == "rlsub-tui: interrupted; no output written.", err
    assert not out.exists() or not any(out.iterdir())
    end = time.monotonic() + 10
    while session_processes(child.pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert session_processes(child.pid) == []


def test_stored_bytes_counts_weight_files_at_a_path(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model-00001-of-00002.safetensors").write_bytes(b"x" * 300)
    (model / "model-00002-of-00002.safetensors").write_bytes(b"x" * 200)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (model / "config.json").write_text("{}" * 1000)
    (model / "nested").mkdir()
    (model / "nested" / "other.safetensors").write_bytes(b"x" * 999)
    from rlsub_tui.compute.workers import stored_bytes

    assert stored_bytes(str(model)) == 500
    assert stored_bytes(str(model / "model-00002-of-00002.safetensors")) == 200
    assert stored_bytes(str(tmp_path / "missing")) == 0
    assert stored_bytes("nobody-here/no-such-model-in-any-cache") == 0


def test_workers_likely_only_on_the_cpu_with_workers_and_a_gibibyte(tmp_path, monkeypatch):
    from rlsub_tui.compute import workers

    big, small = tmp_path / "big.safetensors", tmp_path / "small.safetensors"
    with open(big, "wb") as f:  # sparse: no gibibyte written
        f.truncate(workers.WORKERS_MIN_BYTES // 2)
    small.write_bytes(b"x" * 10)
    pair = [str(big), str(big)]
    monkeypatch.setattr(workers, "gpu_likely", lambda: False)
    assert workers.workers_likely(pair, "cpu", 2)
    assert workers.workers_likely(pair, "auto", 4)
    assert not workers.workers_likely(pair, "cpu", 1)
    assert not workers.workers_likely(pair, "cuda", 2)
    assert not workers.workers_likely([str(big), str(small)], "cpu", 2)  # half a GiB and 10 bytes
    monkeypatch.setattr(workers, "gpu_likely", lambda: True)
    assert not workers.workers_likely(pair, "auto", 2)
    assert workers.workers_likely(pair, "cpu", 2)


def test_analyze_starts_the_workers_server_before_it_imports_torch(checkpoints, tmp_path):
    """The forkserver imports torch beside the analyze process, not after it: `start_early` runs first."""
    script = f"""
import json, sys
from rlsub_tui.util import processes
from rlsub_tui.compute import workers
workers.WORKERS_MIN_BYTES = 0  # before the engine imports it: the tiny model goes to workers too
seen = []
real = processes.start_server
def spy():
    seen.append("torch" in sys.modules)
    real()
processes.start_server = spy
from rlsub_tui.cli.main import main
code = main(["analyze", {str(checkpoints / "base")!r}, {str(checkpoints / "seed0")!r}, {str(checkpoints / "seed1")!r},
             "--out", {str(tmp_path / "out")!r}, "--quiet", "--no-cache", "--device", "cpu", "--workers", "2"])
print(json.dumps({{"code": code, "torch_at_each_start": seen}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["code"] == 0
    # first from start_early, torch not yet imported; again from the pool (a no-op once the server runs)
    assert got["torch_at_each_start"] == [False, True]
    assert (tmp_path / "out" / "matrices.csv").exists()
