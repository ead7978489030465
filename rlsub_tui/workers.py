"""Planned tensors computed in worker processes, several at once, on the CPU (`analyze --workers N`).

The counting is numpy on one thread and holds the GIL for part of its work, so threads do not spread it
over cores; processes do. Each worker opens the same base and runs with the same options (headers only)
and plans the same tensors; the parent sends it a tensor's name and the ranks the cache already knows,
and gets back the tensor's record (masks.compute_tensor's), computed as in one process: the same counts and
ranks; a rank's stable and effective rank may differ in their last digits, since each worker's BLAS has
cores / N threads and sums the Gram in another order.

Memory: the tensors being computed hold at most the two largest planned tensors' bytes (base and runs)
at once, whatever the number of workers: what one process computing alone holds, a tensor and the next
one read ahead. So a model's largest tensor is computed beside small ones only. Each worker is a process
with torch loaded (a few hundred MB of its own, much of it shared with the forkserver it forked from).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Callable, Iterator

from rlsub_tui.errors import ComputeError

_given: tuple = ()  # the worker process's (base, runs, options), as the parent named them
_worker = None  # its own engine.Analysis, opened at its first tensor


def default_workers() -> int:
    """Processes `analyze` computes in on the CPU unless told: one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def _start(cwd: str, environ: dict, base: str, runs: list[str], options, threads: int) -> None:
    """A worker's start: the parent's folder and environment (a forkserver's are its own). Nothing here may
    fail: an initializer's exception would break the whole pool without a word."""
    import torch

    global _given
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)
    limit_blas_threads(threads)
    _given = (base, runs, replace(options, use_cache=False, workers=1))


BLAS_THREAD_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")


def limit_blas_threads(n: int) -> bool:
    """numpy's OpenBLAS (the rank's Gram and eigensolver) to n threads in this process; whether it was found.

    OpenBLAS reads its thread count once, when it loads, and starts one per core: in workers side by side
    that oversubscribes the cores (`analyze` with rank on 2 cores: 28-45 s with two workers, 21-23 s with
    one BLAS thread each; BENCHMARKS.md). Best effort, Linux: the library is found among this process's
    mapped files; elsewhere nothing changes.
    """
    import ctypes

    import numpy  # noqa: F401  (loads the library)

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in BLAS_THREAD_SETTERS:
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(n)
                return True
    return False


def _compute(name: str, known: list):
    """One tensor's record; the first call opens the checkpoints (bad input raises here, and reaches the
    parent as the same InputError)."""
    global _worker
    if _worker is None:
        from rlsub_tui.engine import Analysis

        _worker = Analysis(*_given)
    return _worker.compute_named(name, known)


class TensorWorkers:
    """A pool of worker processes for one analysis; `computed` yields records in the order asked for."""

    def __init__(self, base: str, runs: list[str], options, workers: int):
        from rlsub_tui.analysis_process import process_context

        self.workers = workers
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=process_context(), initializer=_start,
                                        initargs=(os.getcwd(), dict(os.environ), base, list(runs), options, threads))

    def computed(self, plans: list, known: Callable[[object], list], cancelled: Callable[[], bool]) -> Iterator:
        """(plan, record) for each plan in order. At most `workers` tensors are computing at once, holding at
        most the two largest plans' bytes (what one process holds with its read-ahead); records that finish
        early wait, small, for those before them."""
        sizes = sorted((p.nbytes for p in plans), reverse=True)
        budget = sum(sizes[:2])
        pending: deque[tuple[object, Future]] = deque()
        ahead = 0  # the next plan to send
        while ahead < len(plans) or pending:
            running = [(p, f) for p, f in pending if not f.done()]
            held = sum(p.nbytes for p, _ in running)
            while (ahead < len(plans) and len(running) < self.workers and not cancelled()
                   and (not running or held + plans[ahead].nbytes <= budget)):
                plan = plans[ahead]
                future = self.pool.submit(_compute, plan.name, known(plan))
                pending.append((plan, future))
                running.append((plan, future))
                held += plan.nbytes
                ahead += 1
            if not pending:
                return  # cancelled before sending more
            if not pending[0][1].done():
                wait([f for _, f in running], return_when=FIRST_COMPLETED)
                continue
            plan, future = pending.popleft()
            yield plan, self._record(plan, future)
            if cancelled():
                return

    @staticmethod
    def _record(plan, future: Future):
        try:
            return future.result()
        except BrokenProcessPool:
            raise ComputeError(f"a worker process died while comparing tensor '{plan.name}' (out of memory?); "
                             "try --workers 1.") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
