"""CPU rank: rank.update_rank_figures (certified Gram route) against torch.linalg.matrix_rank on Qwen2.5-0.5B shapes.

    python benchmarks/bench_rank.py               # q/o, k/v, gate/up, down; 3 repeats
    python benchmarks/bench_rank.py --embedding   # also the 151936 x 896 embedding (slow: minutes)

Both sides run on one thread and are timed in CPU time of this process (time.process_time), the two
alternating, median of the repeats: on a shared machine wall time measures the neighbours.
`--threads N` (N > 1) times wall clock with N threads instead. Ours runs its Gram and eigensolver in numpy,
so the script gives numpy's OpenBLAS the same number of threads as torch (OPENBLAS_NUM_THREADS, set before
numpy loads). Δ is an
RL-like bf16 update (30% of the weights moved by ~3e-4 on weights of ~0.02) as stored. Every rank is
checked against numpy's float64 SVD under PyTorch's float32 rule.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# OpenBLAS reads its thread count once, when numpy loads it: give it torch's before anything imports numpy.
os.environ["OPENBLAS_NUM_THREADS"] = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")

import numpy as np
import torch

from rlsub_tui.compute.rank import EPS32, certified_rank, update_rank_figures
from rlsub_tui.records.spectrum import rank_figures

SHAPES = {"q_proj / o_proj": (896, 896), "k_proj / v_proj": (128, 896), "gate_proj / up_proj": (4864, 896),
          "down_proj": (896, 4864)}
PER_LAYER = {"q_proj / o_proj": 2, "k_proj / v_proj": 2, "gate_proj / up_proj": 2, "down_proj": 1}


def rl_delta(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    moved = (torch.rand(shape, generator=g) < 0.3) * torch.randn(shape, generator=g) * 3e-4
    return (w0.float() + moved).to(torch.bfloat16) - w0


CLOCK = time.process_time


def cpu_seconds(fn) -> tuple[float, object]:
    t = CLOCK()
    out = fn()
    return CLOCK() - t, out


def previous_route(delta: torch.Tensor):
    """The CPU route before numpy's Gram (eebfe24): the certified count's float64 Gram from torch products (the
    lower column blocks only) and torch's eigvalsh; the certificate's bound, negligible, left out."""
    m, n = delta.shape
    x = delta if m >= n else delta.T
    side = min(m, n)
    lower = torch.zeros((side, side), dtype=torch.float64)
    width = -(-side // 4)
    block = x.to(torch.float32).to(torch.float64)
    for lo in range(0, side, width):
        lower[lo:, lo:lo + width].addmm_(block[:, lo:].T, block[:, lo:lo + width])
    sq = torch.linalg.eigvalsh(lower).numpy()
    return rank_figures(int((sq > sq[-1] * (max(m, n) * EPS32) ** 2).sum()), sq)


def numpy_rank64(delta: torch.Tensor) -> int:
    s = np.linalg.svd(delta.float().numpy().astype(np.float64), compute_uv=False)
    return int((s > s.max() * max(delta.shape) * np.finfo(np.float32).eps).sum())


def measure(shape, repeats: int) -> dict:
    delta = rl_delta(shape, seed=sum(shape))
    ours, ref, before = [], [], []
    for _ in range(repeats):
        t, figures = cpu_seconds(lambda: update_rank_figures(delta))
        ours.append(t)
        t, _ = cpu_seconds(lambda: previous_route(delta))
        before.append(t)
        t, reference = cpu_seconds(lambda: int(torch.linalg.matrix_rank(delta.float())))
        ref.append(t)
    _, _, exact = certified_rank(delta)
    return {"ours": statistics.median(ours), "ref": statistics.median(ref), "before": statistics.median(before), "rank": figures.rank,
            "matrix_rank": reference, "numpy64": numpy_rank64(delta), "exact": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--embedding", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    global CLOCK
    torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter
    unit = "CPU s" if args.threads == 1 else f"wall s, {args.threads} threads"
    shapes = dict(SHAPES, **({"embed_tokens": (151936, 896)} if args.embedding else {}))
    print(f"| matrix | shape | ours ({unit}) | matrix_rank ({unit}) | speed-up | previous route | rank: ours / "
          "matrix_rank / numpy float64 | float64 SVD needed |\n|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, shape in shapes.items():
        r = rows[name] = measure(shape, 1 if name == "embed_tokens" else args.repeats)
        print(f"| {name} | {shape[0]}x{shape[1]} | {r['ours']:.3f} | {r['ref']:.3f} | {r['ref'] / r['ours']:.1f}x | {r['before']:.3f} | "
              f"{r['rank']} / {r['matrix_rank']} / {r['numpy64']} | {'yes' if r['exact'] else 'no'} |", flush=True)
    ours = sum(rows[n]["ours"] * k for n, k in PER_LAYER.items())
    ref = sum(rows[n]["ref"] * k for n, k in PER_LAYER.items())
    before = sum(rows[n]["before"] * k for n, k in PER_LAYER.items())
    print(f"| one layer (2 q/o, 2 k/v, 2 gate/up, 1 down) | | {ours:.3f} | {ref:.3f} | {ref / ours:.1f}x | "
          f"{before:.3f} ({ref / before:.1f}x) | | |")


if __name__ == "__main__":
    main()
