"""Speed and peak memory of `masks`, `transplant` and the timeline pass, next to `analyze`, on the same files.

    python benchmarks/bench_subnetwork.py --layers 4     # Qwen2.5-0.5B shapes, 4 layers, base + 3 runs, bf16
    python benchmarks/bench_subnetwork.py                # all 24 layers

The timeline is the three runs named as steps 1-3 of one run (symlinked `checkpoint-N` folders), so
the timeline pass reads the same bytes as `analyze`. Page cache warm; compare ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import QWEN05, child, model_shapes, read_floor, write_checkpoints  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = write_checkpoints(root, model_shapes(args.layers, **QWEN05), args.runs)
        timeline = root / "timeline"
        timeline.mkdir()
        for i, d in enumerate(dirs[1:], 1):
            os.symlink(d, timeline / f"checkpoint-{i}")
        floor, nbytes = read_floor(dirs)
        base, runs = str(dirs[0]), [str(d) for d in dirs[1:]]
        mask = str(root / "consensus.safetensors")
        jobs = [
            ("analyze (no rank)", ["analyze", base, *runs, "--out", str(root / "a"), "--quiet", "--no-cache", "--no-rank"]),
            ("masks (consensus)", ["masks", base, *runs, "--out", mask, "--quiet"]),
            ("transplant + control", ["transplant", base, runs[0], "--mask", mask, "--out", str(root / "t"),
                                      "--random-control", "0", "--quiet"]),
            ("analyze timeline (3 steps)", ["analyze", base, str(timeline), "--out", str(root / "tl"), "--quiet",
                                            "--no-cache", "--no-rank"]),
        ]
        print(f"{args.layers} layers, base + {args.runs} runs, {nbytes / 1e9:.2f} GB; reading it all once: {floor:.2f}s")
        print(f"{'command':<28} {'wall s':>8} {'x read':>8} {'peak RSS MB':>12}")
        for label, argv in jobs:
            r = child("ours", argv)
            print(f"{label:<28} {r['wall']:>8.2f} {r['wall'] / floor:>8.1f} {r['rss_mb']:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
