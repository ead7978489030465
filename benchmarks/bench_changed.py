"""Where counting a chunk on its changed positions alone pays: both routes on one tensor, by density.

Times `masks.compute_tensor` (no rank, the paper's sweep) on a 4864x896 bf16 tensor (Qwen2.5-0.5B's
gate_proj), base + K runs, with every chunk counted on all its positions and on its changed positions
alone, for several fractions of changed positions, in one process on one thread, beside the minimal
mask pass (`(run - base).abs() > tol`, `count_nonzero`, per run). Prints a table of medians.

    PYTHONPATH=. python benchmarks/bench_changed.py [--runs 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlsub_tui.compute import accumulate
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.records.criteria import DEFAULT_SWEEP, Criterion

SHAPE = (4864, 896)


def tensors(k: int, hot: float, own: float, seed: int = 0):
    """RL-like runs: a seed-independent hot set and each run's own positions, steps around one bf16 ULP."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16)
    shared = torch.rand(SHAPE, generator=g) < hot
    runs = []
    for _ in range(k):
        picked = shared | (torch.rand(SHAPE, generator=g) < own)
        runs.append((base.float() + torch.randn(SHAPE, generator=g) * 2e-4 * picked).to(torch.bfloat16))
    return base, runs


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    criterion = Criterion("atol", 1e-5)
    print(f"4864x896 bf16, base + {args.runs} runs, one thread, medians of {args.repeats}; ms per tensor\n")
    print("| hot / own per run | changed (any run) | all positions | changed alone | ratio | mask pass |")
    print("|---|---|---|---|---|---|")
    for hot, own in ((0.02, 0.02), (0.10, 0.05), (0.25, 0.10), (0.40, 0.10), (0.60, 0.10), (0.80, 0.10),
                     (1.0, 0.0)):
        base, runs = tensors(args.runs, hot, own)
        changed = torch.zeros(SHAPE, dtype=torch.bool)
        for r in runs:
            changed |= (r - base) != 0
        fraction = float(changed.float().mean())

        def analysis(below: float):
            accumulate.CHANGED_ONLY_BELOW = below
            return lambda: compute_tensor(base, runs, criterion, DEFAULT_SWEEP, want_rank=False)

        def mask_pass():
            return sum(int(torch.count_nonzero((r - base).abs() > 1e-5)) for r in runs)

        every = timed(analysis(0.0), args.repeats)
        alone = timed(analysis(2.0), args.repeats)
        anchor = timed(mask_pass, args.repeats)
        print(f"| {hot:.2f} / {own:.2f} | {fraction:.1%} | {every * 1e3:.1f} | {alone * 1e3:.1f} | "
              f"{every / alone:.2f}x | {anchor * 1e3:.1f} |")


if __name__ == "__main__":
    main()
