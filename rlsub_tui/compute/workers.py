"""Planned tensors computed in worker processes, several at once, on the CPU (`analyze --workers N`).

The counting is numpy on one thread and holds the GIL for part of its work, so threads do not spread it
over cores; processes do. Each worker opens the same base and runs with the same options (headers only)
and plans the same tensors; the parent sends it a tensor's name and the ranks the cache already knows,
and gets back the tensor's record (masks.compute_tensor's), computed as in one process: the same counts and
ranks; a rank's stable and effective rank may differ in their last digits, since each worker's BLAS has
cores / N threads and sums the Gram in another order.

Memory: the tensors being computed hold at most the two largest planned tensors' stored bytes (base and
runs) at once, whatever the number of workers, so a model's largest tensor is computed beside small ones
only. Each worker adds its own working set (Δ, chunk temporaries, a rank's Gram) and its own process with
torch loaded (a few hundred MB, much of it shared with the forkserver it forked from): on the 24-layer
benchmark model the process tree peaked at 1.95 GB against 1.31 GB for one process (BENCHMARKS.md).

A worker ends with the pool, or within a second of the analyze process's death (it watches for it), and
refuses checkpoints whose bytes changed since the parent opened them.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Callable, Iterator

from rlsub_tui.util.errors import CheckpointError, ComputeError
from rlsub_tui.util.processes import sigint_deferred

# Below this many bytes to compare (base and runs), worker processes cost more than they save: starting
# them (a forkserver importing torch) takes about a second; the bundled sample (26 MB) took 2.7-3.5 s in
# one process and 3.9-4.1 s with two workers.
WORKERS_MIN_BYTES = 1 << 30

_given: tuple = ()  # the worker process's (base, runs, options), as the parent named them
_opener = None  # what opens the worker's analysis (engine.Analysis, handed over by the parent's engine)
_worker = None  # its own analysis, opened at its first tensor
_fingerprints: tuple = ()  # the parent's (base, [runs]) fingerprints: the worker must open the same bytes


def cores() -> int:
    """The cores this process may run on (its affinity, under taskset or a container's cpuset), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Processes `analyze` computes in on the CPU unless told: one per core, at most 4."""
    return min(4, cores())


def stored_bytes(source: str) -> int:
    """The bytes of the weight files the analysis will read for `source` (locate's files: a file, a folder, its
    shard index, a cached model id), found before torch is imported; 0 where locate refuses it (the analysis
    then says why)."""
    from rlsub_tui.checkpoints.locate import locate

    try:
        return sum(f.stat().st_size for f in locate(source).files)
    except (CheckpointError, OSError):
        return 0


def gpu_likely() -> bool:
    """Whether `--device auto` may find a CUDA GPU, asked without importing torch: NVIDIA's device nodes, WSL's
    GPU, or AMD's (a ROCm build of torch answers to "cuda" too)."""
    return any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))


def workers_likely(paths: list[str], device: str, workers: int) -> bool:
    """Whether `analyze` will most likely compute in worker processes (engine: CPU, workers > 1, at least
    WORKERS_MIN_BYTES to compare), judged from the command line and file sizes alone."""
    on_cpu = device == "cpu" or (device == "auto" and not gpu_likely())
    return on_cpu and workers > 1 and sum(stored_bytes(p) for p in paths) >= WORKERS_MIN_BYTES


def start_early(paths: list[str], device: str, workers: int) -> bool:
    """Start the workers' forkserver now, while this process imports torch itself, when workers are likely:
    the two imports then run side by side (about 0.8 s each here) instead of one after the other. A wrong
    guess costs an idle server, ended with this process. Whether it was started."""
    if not workers_likely(paths, device, workers):
        return False
    from rlsub_tui.util.processes import start_server

    start_server()
    return True


def _watch_parent(pid: int) -> None:
    """End this worker once the analyze process is gone (killed): the pool's queues would never tell it."""
    import time

    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid was reused by someone else's process: the parent is gone too
            os._exit(1)


def _start(cwd: str, environ: dict, opener: Callable, base: str, runs: list[str], options, threads: int,
           parent: int, fingerprints: tuple) -> None:
    """A worker's start: the parent's folder and environment (a forkserver's are its own), cores / N threads
    for torch and BLAS, a watch on the parent. Nothing here may fail: an initializer's exception would break
    the whole pool without a word."""
    import threading

    import torch

    global _given, _fingerprints, _opener
    _fingerprints, _opener = fingerprints, opener
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)
    limit_blas_threads(threads)
    _given = (base, runs, replace(options, use_cache=False, workers=1))
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="rlsub-parent-watch").start()


BLAS_THREAD_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")


def _openblas_libraries() -> list:
    """Every OpenBLAS library this process has loaded (numpy's), opened by ctypes; Linux only, else none."""
    import ctypes

    import numpy  # noqa: F401  (loads its library)

    try:
        with open("/proc/self/maps") as f:  # address perms offset dev inode [path, which may hold spaces]
            fields = [line.rstrip("\n").split(maxsplit=5) for line in f]
    except OSError:
        return []
    libs = []
    for path in sorted({x[5] for x in fields if len(x) == 6 and "openblas" in x[5].lower()}):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def limit_blas_threads(n: int) -> bool:
    """numpy's OpenBLAS (the rank's Gram and eigensolver) to n threads in this process; whether any was set.

    OpenBLAS reads its thread count once, when it loads, and starts one per core: in workers side by side
    that oversubscribes the cores (`analyze` with rank on 2 cores: 28-45 s with two workers, 21-23 s with
    one BLAS thread each; BENCHMARKS.md). Best effort: where no library or setter is found, nothing changes.
    """
    setters = _blas_functions("set")
    for setter in setters:
        setter(n)
    return bool(setters)


def thread_counts() -> tuple[int, list[int]]:
    """Torch's thread count and each OpenBLAS library's in this process (what a worker was given)."""
    import torch

    return torch.get_num_threads(), [int(getter()) for getter in _blas_functions("get")]


def _blas_functions(verb: str) -> list:
    """Each loaded OpenBLAS library's thread-count setter ("set") or getter ("get"), where it has one."""
    found = []
    for lib in _openblas_libraries():
        names = [s.replace("_set_", f"_{verb}_") for s in BLAS_THREAD_SETTERS]
        function = next((getattr(lib, name) for name in names if hasattr(lib, name)), None)
        if function is not None:
            found.append(function)
    return found


def _compute_batch(names: list[str], known: list[list]) -> tuple[list, BaseException | None, str]:
    """The records of a batch of tensors, computed one after another (`TensorWorkers.computed` batches small
    ones). A tensor that fails ends the batch: the records before it come back with its error and the worker's
    traceback, so that the parent still takes them (progress, its cache) before it raises, as it did with one
    task per tensor."""
    import traceback

    records = []
    for name, k in zip(names, known):
        try:
            records.append(_compute(name, k))
        except Exception as exc:  # raised again in the parent, after the records before it
            return records, exc, traceback.format_exc()
    return records, None, ""


class WorkerTraceback(Exception):
    """Where a worker's error came from: its traceback, as text (the cause of the error raised again)."""

    def __str__(self) -> str:
        return self.args[0]


def _compute(name: str, known: list):
    """One tensor's record; the first call opens the checkpoints (bad input raises here, and reaches the
    parent as the same InputError)."""
    global _worker
    if _worker is None:
        opened = _opener(*_given)
        base_fp, run_fps = opened.fingerprints()
        expected = [_fingerprints[0], *_fingerprints[1]]
        for ckpt, mine, theirs in zip([opened.base, *opened.runs], [base_fp, *run_fps], expected):
            if mine != theirs:
                opened.close()
                raise CheckpointError(f"{ckpt.source}: changed while it was being analyzed; run the analysis again.")
        _worker = opened
    return _worker.compute_named(name, known)


BATCH_BYTES = 16 << 20  # consecutive tensors smaller than this go to a worker together, up to this much in all


def batches(plans: list) -> list[list]:
    """`plans` in order, cut into batches: each tensor of BATCH_BYTES or more alone, smaller consecutive ones
    together up to BATCH_BYTES. One task per tensor cost each of a model's many small tensors (norms, biases) a
    round trip to a worker, while the other worker computed the large embedding alone."""
    out: list[list] = []
    total = 0
    for plan in plans:
        if plan.nbytes >= BATCH_BYTES or not out or total + plan.nbytes > BATCH_BYTES:
            out.append([plan])
            total = plan.nbytes
        else:
            out[-1].append(plan)
            total += plan.nbytes
    return out


def largest(batch: list):
    """A batch's largest plan: its stored bytes are what the batch holds at once (its tensors are computed one
    after another), and its name the likeliest culprit if the worker dies."""
    return max(batch, key=lambda p: p.nbytes)


class TensorWorkers:
    """A pool of worker processes for one analysis; `computed` yields records in the order asked for."""

    def __init__(self, opener: Callable, base: str, runs: list[str], options, workers: int, fingerprints: tuple):
        """`opener(base, runs, options)` opens the analysis each worker computes with (the engine's Analysis)."""
        from rlsub_tui.util.processes import process_context, start_server

        start_server()  # now, ignoring Ctrl-C, which this process handles for its workers
        self.workers = workers
        threads = max(1, cores() // workers)
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=process_context(), initializer=_start,
                                        initargs=(os.getcwd(), dict(os.environ), opener, base, list(runs), options,
                                                  threads, os.getpid(), fingerprints))

    def computed(self, plans: list, known: Callable[[object], list], cancelled: Callable[[], bool]) -> Iterator:
        """(plan, record) for each plan in order. Consecutive small plans go to a worker as one batch
        (`batches`). At most `workers` + 1 batches are sent and not finished at once (one waits in the pool's
        queue, so that a worker that finishes starts the next without a round trip: 3-5% off the benchmark's
        wall time), whose largest tensors' stored bytes add up to at most the two largest plans' (one batch
        alone may always start); records that finish early wait, small, for those before them."""
        sizes = sorted((p.nbytes for p in plans), reverse=True)
        budget = sum(sizes[:2])
        pending: deque[tuple[list, Future]] = deque()
        todo = batches(plans)
        ahead = 0  # the next batch to send
        while ahead < len(todo) or pending:
            running = [(b, f) for b, f in pending if not f.done()]
            held = sum(largest(b).nbytes for b, _ in running)
            while (ahead < len(todo) and len(running) <= self.workers and not cancelled()
                   and (not running or held + largest(todo[ahead]).nbytes <= budget)):
                batch = todo[ahead]
                try:
                    with sigint_deferred():  # a submit may start a worker: not to be cut off half-started
                        future = self.pool.submit(_compute_batch, [p.name for p in batch], [known(p) for p in batch])
                except BrokenProcessPool:  # a worker died: the futures in flight say so, in order
                    if not pending:
                        raise self._died([batch]) from None
                    break
                pending.append((batch, future))
                running.append((batch, future))
                held += largest(batch).nbytes
                ahead += 1
            if not pending:
                return  # cancelled before sending more
            if not pending[0][1].done():
                wait([f for _, f in running], return_when=FIRST_COMPLETED)
                continue
            try:
                records, error, where = pending[0][1].result()
            except BrokenProcessPool:
                raise self._died([b for b, _ in pending]) from None
            for plan, record in zip(pending.popleft()[0], records):
                yield plan, record
                if cancelled():
                    return
            if error is not None:
                raise error from WorkerTraceback(where)

    @staticmethod
    def _died(in_flight: list[list]) -> ComputeError:
        """A worker died (killed, most likely for memory): which tensor's worker it was, the pool cannot tell.
        Each batch in flight is named by its largest tensor, the likeliest to have cost the memory, largest
        first (one batch may still have been waiting in the pool's queue)."""
        plans = sorted((largest(batch) for batch in in_flight), key=lambda p: -p.nbytes)
        names = ", ".join(f"'{p.name}'" for p in plans[:3]) + (f" and {len(plans) - 3} more" if len(plans) > 3 else "")
        return ComputeError(f"a worker process died (out of memory?) while these tensors were being compared: "
                            f"{names}; try fewer --workers, or --workers 1.")

    def close(self, finished: bool = True) -> None:
        """The pool shut down: after its last record, at once; early (an error, a cancel, the consumer gone),
        its workers are ended rather than waited for, since a tensor in flight can take minutes."""
        if not finished:
            for process in list((getattr(self.pool, "_processes", None) or {}).values()):  # no public terminate before 3.14
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
