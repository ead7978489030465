"""What the precision and line passes per chunk (bf16 visibility, distance to visibility, rows and columns) cost.

Times `masks.compute_tensor` without rank, with the paper's sweep, K runs, on Qwen2.5-0.5B layer shapes,
alternately with the passes on and with them replaced by a pass that does nothing, in one process, and
prints a table of medians and their ratio. CPU time of this process (the machine may be busy).

    PYTHONPATH=. python benchmarks/bench_precision_cost.py [--dtype bf16|fp32] [--runs 3] [--rounds 5]

With --analyze: the issue's own measure, `rlsub-tui analyze --no-rank --no-cache` end to end (a fresh process
reading bench_engine.py's synthetic Qwen2.5-0.5B-shaped bf16 checkpoints, base + 3 runs, page cache warm),
rounds alternating with and without the passes, wall time, medians:

    PYTHONPATH=. python benchmarks/bench_precision_cost.py --analyze --layers 8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlsub_tui.compute import accumulate
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.records.criteria import DEFAULT_SWEEP, Criterion

SHAPES = {"q_proj 896x896": (896, 896), "k_proj 128x896": (128, 896), "gate_proj 4864x896": (4864, 896),
          "down_proj 896x4864": (896, 4864), "norm 896": (896,)}


class NoPasses:
    """Stands in for accumulate.PrecisionAndLines: counts nothing, reports nothing. (Runs with it also carry no
    distance keys in their state words: StateCodes.carries_exponents is switched off beside it.)"""

    def __init__(self, dtypes, shape, device, layout, state_tables=None):
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


CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
passes, args = sys.argv[1] == "on", json.loads(sys.argv[2])
sys.path.insert(0, "benchmarks")
if not passes:
    from rlsub_tui.compute import accumulate
    from bench_precision_cost import NoPasses
    accumulate.PrecisionAndLines = NoPasses
    accumulate.StateCodes.carries_exponents = False  # no distance keys carried in the state and bin words
from rlsub_tui.cli.main import main
assert main(args) == 0
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.perf_counter() - start, "cpu": use.ru_utime + use.ru_stime}))
"""


def end_to_end(layers: int, runs: int, rounds: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_engine import QWEN05, model_shapes, read_floor, write_checkpoints

    root = Path(tempfile.gettempdir()) / "rlsub-bench" / f"L{layers}"
    dirs = write_checkpoints(root, model_shapes(layers, **QWEN05), runs)
    read_floor(dirs)  # warm the page cache
    args = ["analyze", *map(str, dirs), "--out", str(root.parent / "out-precision-cost"), "--quiet", "--no-cache",
            "--no-rank", "--device", "cpu", "--workers", "1"]  # one process: the switch below reaches no worker
    times = {(passes, what): [] for passes in ("on", "off") for what in ("wall", "cpu")}
    for _ in range(rounds):
        for passes in ("off", "on"):
            out = subprocess.run([sys.executable, "-c", CHILD, passes, json.dumps(args)], capture_output=True,
                                 text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            for what in ("wall", "cpu"):
                times[(passes, what)].append(got[what])
    print(f"`analyze --no-rank`, end to end, bf16, base + {runs} runs, {layers} layers; medians of {rounds} rounds\n")
    print("| time | without the passes | with them | ratio | every round (without / with) |")
    print("|---|---|---|---|---|")
    for what, label in (("wall", "wall"), ("cpu", "CPU (user + system, all threads)")):
        off, on = (statistics.median(times[(p, what)]) for p in ("off", "on"))
        every = " / ".join(", ".join(f"{t:.2f}" for t in times[(p, what)]) for p in ("off", "on"))
        print(f"| {label} | {off:.2f} s | {on:.2f} s | {on / off:.2f}x | {every} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--analyze", action="store_true", help="end to end: analyze --no-rank in fresh processes")
    p.add_argument("--layers", type=int, default=8, help="with --analyze: the synthetic model's depth")
    a = p.parse_args()
    if a.analyze:
        end_to_end(a.layers, a.runs, a.rounds)
        return
    layer = tensors(torch.bfloat16 if a.dtype == "bf16" else torch.float32, a.runs)
    real = accumulate.PrecisionAndLines
    times = {"with the passes": [], "without": []}
    one_layer(layer)  # warm-up
    for _ in range(a.rounds):
        for label, cls in (("with the passes", real), ("without", NoPasses)):
            accumulate.PrecisionAndLines = cls
            accumulate.StateCodes.carries_exponents = cls is real  # the carried keys are part of the passes
            times[label].append(one_layer(layer))
    accumulate.PrecisionAndLines = real
    accumulate.StateCodes.carries_exponents = True
    with_, without = (statistics.median(times[k]) for k in ("with the passes", "without"))
    print("| pairs | K | layer (Qwen2.5-0.5B shapes) without | with the passes | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {a.dtype} | {a.runs} | {without:.3f} s | {with_:.3f} s | {with_ / without:.2f}x |")


if __name__ == "__main__":
    main()
