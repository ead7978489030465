"""What a change to the per-tensor computation costs: two source trees timed alternately, in one run.

    python benchmarks/bench_trees.py --before /work/main --after .            # compute_tensor alone
    python benchmarks/bench_trees.py --before /work/main --after . --analyze  # also `analyze --no-rank`

Each round runs one fresh process per tree, in turn (before, after, before, after, ...). A process builds
the same tensors (Qwen2.5-0.5B shapes of `--layers` layers, embedding left out, base + K runs with ~30%
of the parameters moved), then times the tree's own `masks.compute_tensor` over them without rank, with
the CLI's default criterion and sweep, on one thread, in CPU time (threads spinning on a busy machine are
not work). bf16 pairs (the benchmark model's) and fp32 pairs (the precision path) are timed separately.
With --analyze, whole `analyze --no-rank --no-cache` runs of each tree on bench_engine's bf16 checkpoints
alternate too (CPU time of the child; wall time swings with the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, statistics, sys, time
tree, bench, dtype = sys.argv[1], sys.argv[2], sys.argv[6]
layers, runs, repeats = (int(x) for x in sys.argv[3:6])
sys.path.insert(0, tree)
sys.path.insert(1, bench)
import torch
from bench_engine import QWEN05, model_shapes
from rlsub_tui.records.criteria import DEFAULT_SWEEP, Criterion
from rlsub_tui.compute.masks import compute_tensor
import rlsub_tui
assert rlsub_tui.__file__.startswith(tree), rlsub_tui.__file__
torch.set_num_threads(1)
stored = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
g = torch.Generator().manual_seed(0)
tensors = []
for name, shape in model_shapes(layers, **QWEN05).items():
    if "embed" in name:
        continue
    base = (torch.randn(shape, generator=g) * 0.02).to(stored)
    ups = [(base.float() + torch.randn(shape, generator=g) * 2e-4 * (torch.rand(shape, generator=g) < 0.3))
           .to(stored) for _ in range(runs)]
    tensors.append((base, ups))
times = []
for _ in range(repeats):
    start = time.process_time()
    for base, ups in tensors:
        compute_tensor(base, ups, Criterion("atol", 1e-5), tuple(DEFAULT_SWEEP), want_rank=False)
    times.append(time.process_time() - start)
print(json.dumps({"cpu": statistics.median(times)}))
"""


def in_process(tree: Path, layers: int, runs: int, repeats: int, dtype: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(HERE), str(layers), str(runs), str(repeats),
                          dtype], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["cpu"]


def analyze(tree: Path, dirs: list[Path], out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `analyze --no-rank --no-cache` of this tree in a fresh process."""
    args = ["analyze", str(dirs[0]), *map(str, dirs[1:]), "--out", str(out), "--quiet", "--no-cache", "--no-rank",
            "--device", "cpu"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rlsub_tui", *args], check=True, cwd=tree, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def report(label: str, before: list[float], after: list[float]) -> None:
    b, a = statistics.median(before), statistics.median(after)
    print(f"| {label} | {b:.2f} | {a:.2f} | {100 * (a / b - 1):+.1f}% | "
          f"{', '.join(f'{x:.2f}' for x in before)} / {', '.join(f'{x:.2f}' for x in after)} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="source tree before the change")
    p.add_argument("--after", type=Path, default=HERE.parent, help="source tree after the change")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (one process per tree each)")
    p.add_argument("--repeats", type=int, default=3, help="timings per process (their median is its figure)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--analyze", action="store_true")
    p.add_argument("--analyze-layers", type=int, default=4)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "rlsub-bench-trees")
    args = p.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    print(f"machine: {platform.node()} · {os.cpu_count()} cores · cpu · {date.today()} · load {os.getloadavg()[0]:.1f}")
    print(f"before: {trees['before']}  after: {trees['after']}")
    print("| measure | before | after | change | every round (before / after) |\n|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        times = {k: [] for k in trees}
        for _ in range(args.rounds):
            for k, tree in trees.items():
                times[k].append(in_process(tree, args.layers, args.runs, args.repeats, dtype))
        report(f"compute_tensor, {dtype}, {args.layers} layers, K={args.runs}, CPU s", times["before"], times["after"])
    if args.analyze:
        sys.path.insert(0, str(HERE))
        from bench_engine import QWEN05, model_shapes, read_floor, write_checkpoints

        dirs = write_checkpoints(args.dir / f"L{args.analyze_layers}", model_shapes(args.analyze_layers, **QWEN05),
                                 args.runs)
        read_floor(dirs)
        runs = {k: [] for k in trees}
        for _ in range(args.rounds):
            for k, tree in trees.items():
                runs[k].append(analyze(tree, dirs, args.dir / f"out-{k}"))
        report(f"analyze --no-rank, bf16, {args.analyze_layers} layers, K={args.runs}, CPU s",
               [c for _, c in runs["before"]], [c for _, c in runs["after"]])
        report("  the same, wall s", [w for w, _ in runs["before"]], [w for w, _ in runs["after"]])
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
