"""Cost of pooling finished results (no checkpoints read): the model's Stats, the explorer's per-node index,
and the five output files, on per-tensor records shaped like a real model's.

    python benchmarks/bench_pooling.py                       # Qwen2.5-0.5B shapes, 3 runs
    python benchmarks/bench_pooling.py --layers 80 --runs 6  # a 70B-deep model, 6 runs
    python benchmarks/bench_pooling.py --src OTHER_TREE      # the same, with another checkout's rlsub_tui

The records hold random but consistent counts (per |w0| bin, per pair, agreement), so every
pooled figure, the stratified chance included, is computed as on a real analysis.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def records(layers: int, k: int, seed: int = 0):
    from bench_engine import QWEN05, model_shapes

    from rlsub_tui.records.criteria import MAG_BINS, RunTensorStats
    from rlsub_tui.records.results import TensorResult

    g = np.random.default_rng(seed)
    out = {}
    for name, shape in model_shapes(layers, **QWEN05).items():
        numel = int(np.prod(shape))
        mag_numel = np.bincount(g.integers(8, MAG_BINS, size=4096), minlength=MAG_BINS) * (numel // 4096)
        mag_numel[9] += numel - mag_numel.sum()
        runs = []
        for _ in range(k):
            upd = g.binomial(mag_numel, g.uniform(0.05, 0.9, size=MAG_BINS))
            rank = min(shape) if len(shape) == 2 else None
            runs.append(RunTensorStats(updated=int(upd.sum()), nonfinite=0, sum_abs_delta=1.0, sq_delta=1.0,
                                       sq_base=2.0, sweep=[], rank=rank, magnitude_updated=[int(x) for x in upd]))
        both = {(a, b): min(runs[a].updated, runs[b].updated) // 2 for a in range(k) for b in range(a + 1, k)}
        agreement = [0] * (k + 1)
        agreement[0] = numel
        out[name] = TensorResult(name, "bf16", list(shape), numel, runs, both, agreement, 0, 0,
                                 [int(x) for x in mag_numel], [])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5, help="best of this many timings")
    p.add_argument("--src", type=Path, help="import rlsub_tui from this source tree instead")
    args = p.parse_args()
    if args.src:
        sys.path.insert(0, str(args.src.resolve()))
    import rlsub_tui
    from rlsub_tui.export.outputs import write_outputs
    from rlsub_tui.records.results import AnalysisResult
    from rlsub_tui.summaries.tables import StatsIndex
    from rlsub_tui.summaries.tree import build_tree

    tensors = records(args.layers, args.runs)
    labels = [f"run{i}" for i in range(args.runs)]
    result = AnalysisResult("base", "base", labels, labels, criterion=None, sweep=(), device="cpu",
                            tensors=tensors, planned=list(tensors),
                            planned_numel={n: t.numel for n, t in tensors.items()}, complete=True)
    from rlsub_tui.records.criteria import Criterion

    result.criterion = Criterion()

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    roots = build_tree(list(tensors))
    out = Path(tempfile.mkdtemp())
    print(f"rlsub_tui from {Path(rlsub_tui.__file__).parent}")
    print(f"{len(tensors)} tensors, {args.runs} runs, best of {args.repeat}")
    t0 = time.perf_counter()
    result.stats()
    print(f"model Stats, first pooling            {1000 * (time.perf_counter() - t0):8.1f} ms")
    print(f"model Stats (pool every tensor once)  {1000 * best(lambda: result.stats()):8.1f} ms")
    print(f"explorer StatsIndex (every node)      {1000 * best(lambda: StatsIndex(roots, result)):8.1f} ms")
    print(f"write_outputs (five files)            {1000 * best(lambda: write_outputs(result, out)):8.1f} ms")


if __name__ == "__main__":
    main()
