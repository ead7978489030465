"""The subspace overlaps' cost: one tensor's compute_tensor with the rank, with and without the subspaces, on
Qwen2.5-0.5B widths, K runs (RL-like bf16 updates of a bf16 base), one thread, CPU time of this process.

    python benchmarks/bench_subspaces.py             # K = 3, one layer's q/k/v/o, gate/up/down; 3 repeats
    python benchmarks/bench_subspaces.py --runs 4 --repeats 5
    python benchmarks/bench_subspaces.py --analysis 4 --repeats 3   # also the whole analysis, 4 layers

The two variants alternate, the median of the repeats is kept, and the table gives the ratio measured in the
same run: (with subspaces) / (rank only), per matrix and for the layer. The issue's budget is at most 1.30 over
the analysis with rank; the analysis also reads the files and counts the masks, so this per-tensor ratio is an
upper bound of the whole analysis' one. The overlaps are checked against numpy's SVD on the first matrix.

The "floor" column is what no implementation built on a dense eigendecomposition can go below: the rank alone,
plus for each run one eigendecomposition with vectors in place of the rank's values-only one, plus the base
weight's Gram and eigendecomposition (its directions are needed once per matrix), each timed alone here.

`--analysis L` also times `rlsub-tui analyze` end to end (child processes, its default workers, wall seconds)
with the rank, with and without the subspaces, on bench_engine's synthetic Qwen2.5-0.5B-width checkpoints of L
layers, their embedding's rows scaled by L/24 so that it weighs in the model as in the 24-layer one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when numpy loads: one thread, as torch below

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import QWEN05, model_shapes, ours, write_checkpoints  # noqa: E402

from rlsub_tui.compute.masks import compute_tensor  # noqa: E402
from rlsub_tui.compute.rank import cpu_gram  # noqa: E402
from rlsub_tui.records.criteria import Criterion  # noqa: E402
from rlsub_tui.records.subspaces import SubspaceRow  # noqa: E402

SHAPES = {"q_proj / o_proj": (896, 896), "k_proj / v_proj": (128, 896), "gate_proj / up_proj": (4864, 896),
          "down_proj": (896, 4864)}
PER_LAYER = {"q_proj / o_proj": 2, "k_proj / v_proj": 2, "gate_proj / up_proj": 2, "down_proj": 1}


def tensors(shape, k: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base of weights ~0.02 and K runs moving a shared 20% and their own 10% of them by ~3e-4."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    shared = torch.rand(shape, generator=g) < 0.2
    runs = []
    for _ in range(k):
        moved = shared | (torch.rand(shape, generator=g) < 0.1)
        runs.append((w0.float() + moved * torch.randn(shape, generator=g) * 3e-4).to(torch.bfloat16))
    return w0, runs


def seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def floor(w0: torch.Tensor, runs: list[torch.Tensor], rank_only: float) -> float:
    """The rank alone plus what any dense-eigendecomposition route adds: per run eigh − eigvalsh of its Gram, and
    the base weight's Gram and eigh (CPU seconds, each the fastest of three)."""
    def best(fn) -> float:
        return min(seconds(fn) for _ in range(3))
    grams = [cpu_gram(x.float() - w0.float()) for x in runs]
    extra = sum(best(lambda: np.linalg.eigh(g)) - best(lambda: np.linalg.eigvalsh(g)) for g in grams)
    return rank_only + extra + best(lambda: np.linalg.eigh(cpu_gram(w0)))


def analysis(layers: int, k: int, repeats: int, root) -> None:
    """`analyze` with the rank, with and without the subspaces, alternated; wall seconds, median of `repeats`."""
    shapes = dict(QWEN05, vocab=max(1, QWEN05["vocab"] * layers // 24))
    dirs = write_checkpoints(root, model_shapes(layers, **shapes), k)
    plain, with_subspaces = [], []
    for i in range(repeats):
        plain.append(ours(dirs, root / "out", ["--no-subspaces"])["wall"])
        with_subspaces.append(ours(dirs, root / "out")["wall"])
    a, b = statistics.median(plain), statistics.median(with_subspaces)
    print(f"# analyze, {layers} layers + embedding ({shapes['vocab']} rows), K = {k}, wall seconds, median of "
          f"{repeats}: with the rank {a:.1f} (rounds {', '.join(f'{x:.1f}' for x in plain)}), + subspaces {b:.1f} "
          f"(rounds {', '.join(f'{x:.1f}' for x in with_subspaces)}); ratio {b / a:.2f}")


def check(w0: torch.Tensor, runs: list[torch.Tensor]) -> float:
    """The largest difference between our pair overlaps and numpy's SVD ones on one matrix."""
    r = compute_tensor(w0, runs, Criterion(), want_rank=True, want_subspaces=True)
    deltas = [(x.double() - w0.double()).numpy() for x in runs]
    svd = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    worst = 0.0
    for row in map(SubspaceRow.from_list, r.subspaces):
        if row.b < 0:
            continue
        (ua, _, va), (ub, _, vb) = svd[row.a], svd[row.b]
        a, b = (ua[:, :row.k], ub[:, :row.k]) if row.side == "left" else (va[:row.k].T, vb[:row.k].T)
        worst = max(worst, abs(row.overlap - float(np.sum((a.T @ b) ** 2)) / row.k))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--analysis", type=int, metavar="L", help="also time analyze end to end on L layers")
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rlsub-bench-subspaces"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# K = {args.runs}, {args.repeats} repeats, one thread, CPU seconds (median); torch {torch.__version__}")
    first = tensors((896, 896), args.runs, 0)
    print(f"# overlaps against numpy's SVD (896 x 896): largest difference {check(*first):.2e}")
    print(f"{'matrix':<22} {'shape':>11} {'rank only':>10} {'+ subspaces':>12} {'ratio':>6} {'floor':>7}")
    layer = [0.0, 0.0, 0.0]
    for i, (name, shape) in enumerate(SHAPES.items()):
        w0, runs = tensors(shape, args.runs, i + 1)
        plain, with_subspaces = [], []
        for _ in range(args.repeats):
            plain.append(seconds(lambda: compute_tensor(w0, runs, Criterion(), want_rank=True, want_subspaces=False)))
            with_subspaces.append(seconds(lambda: compute_tensor(w0, runs, Criterion(), want_rank=True,
                                                                 want_subspaces=True)))
        a, b = statistics.median(plain), statistics.median(with_subspaces)
        least = floor(w0, runs, a)
        for i, x in enumerate((a, b, least)):
            layer[i] += PER_LAYER[name] * x
        print(f"{name:<22} {'x'.join(map(str, shape)):>11} {a:>10.3f} {b:>12.3f} {b / a:>6.2f} {least / a:>7.2f}")
    print(f"{'one layer (7 matrices)':<22} {'':>11} {layer[0]:>10.3f} {layer[1]:>12.3f} {layer[1] / layer[0]:>6.2f} "
          f"{layer[2] / layer[0]:>7.2f}")
    if args.analysis:
        from pathlib import Path
        analysis(args.analysis, args.runs, args.repeats, Path(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
