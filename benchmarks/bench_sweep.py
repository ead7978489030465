"""What the tolerance sweep (1e-8, 1e-7, 1e-6, 1e-5) costs: `analyze` with and without it, in one run.

    python benchmarks/bench_sweep.py                 # Qwen2.5-0.5B shapes, base + 3 runs, bf16
    python benchmarks/bench_sweep.py --layers 4      # a quick look

Runs alternate (off, on, off, on, ...) on the same files with the page cache warm; the median of
each is compared, with and without the rank computation. Each run is a fresh process; besides its
wall time we record its CPU time (user + system, all threads), which other processes on a shared
machine disturb far less than the wall time.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "rlsub-bench-sweep")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dirs = write_checkpoints(args.dir / f"L{args.layers}", model_shapes(args.layers, **QWEN05), args.runs)
    read_floor(dirs)
    print(f"machine: {platform.node()} · {os.cpu_count()} cores · {args.device} · {date.today()}")
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
