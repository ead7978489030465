"""What issue 11's per-chunk passes (bf16 visibility, distance to visibility, rows and columns) cost.

Times `masks.compute_tensor` without rank, with the paper's sweep, K runs, on Qwen2.5-0.5B layer shapes,
alternately with the passes on and with them replaced by a pass that does nothing, in one process, and
prints a table of medians and their ratio. CPU time of this process (the machine may be busy).

    PYTHONPATH=. python benchmarks/bench_precision_cost.py [--dtype bf16|fp32] [--runs 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlsub_tui import accumulate
from rlsub_tui.criteria import DEFAULT_SWEEP, Criterion
from rlsub_tui.masks import compute_tensor

SHAPES = {"q_proj 896x896": (896, 896), "k_proj 128x896": (128, 896), "gate_proj 4864x896": (4864, 896),
          "down_proj 896x4864": (896, 4864), "norm 896": (896,)}


class NoPasses:
    """Stands in for accumulate.PrecisionAndLines: counts nothing, reports nothing."""

    def __init__(self, dtypes, shape, device, shifts):
        self.k = len(dtypes)

    def add(self, chunk) -> None:
        pass

    def finish(self, out) -> None:
        out.precision = [None] * self.k
        out.lines = [None] * self.k


def tensors(dtype: torch.dtype, k: int):
    g = torch.Generator().manual_seed(0)
    layer = []
    for shape in SHAPES.values():
        base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        runs = []
        for _ in range(k):
            step = torch.randn(shape, generator=g) * 2e-4 * (torch.rand(shape, generator=g) < 0.3)
            runs.append((base.float() + step).to(dtype))
        layer.append((base, runs))
    return layer


def one_layer(layer) -> float:
    start = time.process_time()
    for base, runs in layer:
        compute_tensor(base, runs, Criterion("atol", 1e-5), sweep=DEFAULT_SWEEP, want_rank=False)
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    layer = tensors(torch.bfloat16 if a.dtype == "bf16" else torch.float32, a.runs)
    real = accumulate.PrecisionAndLines
    times = {"with the passes": [], "without": []}
    one_layer(layer)  # warm-up
    for _ in range(a.rounds):
        for label, cls in (("with the passes", real), ("without", NoPasses)):
            accumulate.PrecisionAndLines = cls
            times[label].append(one_layer(layer))
    accumulate.PrecisionAndLines = real
    with_, without = (statistics.median(times[k]) for k in ("with the passes", "without"))
    print(f"| pairs | K | layer (Qwen2.5-0.5B shapes) without | with the passes | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {a.dtype} | {a.runs} | {without:.3f} s | {with_:.3f} s | {with_ / without:.2f}x |")


if __name__ == "__main__":
    main()
