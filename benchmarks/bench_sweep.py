"""What the tolerance sweep (1e-8, 1e-7, 1e-6, 1e-5) costs, with and without it, in one run.

    python benchmarks/bench_sweep.py --in-process-only   # compute_tensor alone: the steadiest figure
    python benchmarks/bench_sweep.py                     # also `analyze` end to end, Qwen2.5-0.5B shapes
    python benchmarks/bench_sweep.py --layers 4          # a quicker end-to-end look

First `compute_tensor` alone, in this process, on one thread, on two layers of real shapes, CPU
time, with and without rank. Then, unless --in-process-only, whole `analyze` runs: they alternate
(off, on, off, on, ...) on the same files with the page cache warm; the median of each is
compared, with and without the rank computation. Each run is a fresh process; besides its wall
time we record its CPU time (user + system, all threads). On a busy shared machine both swing
wildly (see BENCHMARKS.md): trust the in-process figure there.
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

sys.path.insert(0, str(Path(__file__).parent))

from bench_engine import QWEN05, model_shapes, read_floor, write_checkpoints  # noqa: E402

PAPER_SWEEP = "1e-8,1e-7,1e-6,1e-5"
ROOT = Path(__file__).resolve().parent.parent


def analyze(dirs: list[Path], out: Path, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `rlsub-tui analyze` in a fresh process."""
    args = ["analyze", str(dirs[0]), *map(str, dirs[1:]), "--out", str(out), "--quiet", "--no-cache", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rlsub_tui", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def in_process(layers: int, runs: int, repeats: int, rank: bool) -> tuple[float, float]:
    """CPU seconds of `compute_tensor` alone (no reading, no process start) over `layers` layers' tensors,
    without and with the sweep, alternating; the medians. Isolates what the sweep adds to the computation."""
    import torch

    from rlsub_tui.compute.masks import compute_tensor
    from rlsub_tui.records.criteria import Criterion

    torch.set_num_threads(1)  # CPU time then measures work, not threads spinning on a busy machine
    g = torch.Generator().manual_seed(0)
    tensors = []
    for name, shape in model_shapes(layers, **QWEN05).items():
        if "embed" in name:
            continue
        base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        ups = [(base.float() + torch.randn(shape, generator=g) * 2e-4 * (torch.rand(shape, generator=g) < 0.3))
               .to(torch.bfloat16) for _ in range(runs)]
        tensors.append((base, ups))
    sweep = tuple(float(t) for t in PAPER_SWEEP.split(","))
    times = {(): [], sweep: []}
    for _ in range(repeats):
        for sw in ((), sweep):
            start = time.process_time()
            for base, ups in tensors:
                compute_tensor(base, ups, Criterion("atol", 1e-5), sw, want_rank=rank)
            times[sw].append(time.process_time() - start)
    return statistics.median(times[()]), statistics.median(times[sweep])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "rlsub-bench-sweep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--in-process-only", action="store_true",
                   help="only time compute_tensor in this process (the figure least disturbed by a busy machine)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"machine: {platform.node()} · {os.cpu_count()} cores · cpu · {date.today()}")
    for rank in (False, True):
        off, on = in_process(2, args.runs, max(args.repeats, 5), rank)
        print(f"compute_tensor alone, {'with' if rank else 'no'} rank, 2 layers of Qwen2.5-0.5B shapes (no "
              f"embedding), K={args.runs}, CPU time (median of {max(args.repeats, 5)}): sweep off {off:.2f} s, "
              f"on {on:.2f} s -> {100 * (on / off - 1):+.1f}%", flush=True)
    if args.in_process_only:
        return 0
    dirs = write_checkpoints(args.dir / f"L{args.layers}", model_shapes(args.layers, **QWEN05), args.runs)
    read_floor(dirs)
    print(f"model: Qwen2.5-0.5B shapes, {args.layers} layers, base + {args.runs} runs, bf16")
    print("| rank | sweep off: CPU s (wall s) | sweep on: CPU s (wall s) | cost in CPU time | cost in wall time |")
    print("|---|---|---|---|---|")
    for rank in (False, True):
        extra = ["--device", args.device] + ([] if rank else ["--no-rank"])
        off, on = [], []
        for _ in range(args.repeats):
            off.append(analyze(dirs, args.dir / "out", extra + ["--sweep", "none"]))
            on.append(analyze(dirs, args.dir / "out", extra + ["--sweep", PAPER_SWEEP]))
        w_off, c_off = (statistics.median(x[i] for x in off) for i in (0, 1))
        w_on, c_on = (statistics.median(x[i] for x in on) for i in (0, 1))
        print(f"| {'yes' if rank else 'no'} | {c_off:.2f} ({w_off:.2f}) | {c_on:.2f} ({w_on:.2f}) | "
              f"{100 * (c_on / c_off - 1):+.1f}% | {100 * (w_on / w_off - 1):+.1f}% |", flush=True)
        print(json.dumps({"rank": rank, "off": off, "on": on}), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
