"""The per-chunk counting alone (no reading, no process start): compute_tensor against the bare mask pass.

    python benchmarks/bench_accumulate.py            # one Qwen2.5-0.5B layer's matrices, base + 3 bf16 runs
    python benchmarks/bench_accumulate.py --repeats 5

Both run in this process on the same in-memory tensors, alternating; the table gives the median of each
and their ratio (target: every statistic at most 2x the mask pass). The mask pass is the paper's:
`(run - base).abs() > tol` and `count_nonzero`, per run, on the whole tensor, with torch's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlsub_tui.compute.masks import compute_tensor  # noqa: E402
from rlsub_tui.records.criteria import PAPER_SWEEP, Criterion  # noqa: E402

SHAPES = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
          "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}


def tensors(shape, k, dtype, g):
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    hot = torch.rand(shape, generator=g) < 0.25
    runs = [(base.float() + torch.randn(shape, generator=g) * 2e-4 * (hot | (torch.rand(shape, generator=g) < 0.1)))
            .to(dtype) for _ in range(k)]
    return base, runs


def mask_pass(base, runs):
    return [int(torch.count_nonzero((r - base).abs() > 1e-5)) for r in runs]


def old_compute_tensor(rev: str):
    """compute_tensor as masks.py had it at a git revision (its imports resolve to this checkout)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:rlsub_tui/compute/masks.py"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp()) / "old_masks.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_masks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_masks"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.compute_tensor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--compare-with", metavar="REV", help="also time compute_tensor of masks.py at this git revision")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(0)
    data = {n: tensors(s, args.runs, dtype, g) for n, s in SHAPES.items()}
    params = sum(b.numel() for b, _ in data.values())
    cases = {"mask pass": lambda b, rs: mask_pass(b, rs),
             "compute_tensor, no sweep": lambda b, rs: compute_tensor(b, rs, Criterion(), (), want_rank=False),
             "compute_tensor, paper sweep": lambda b, rs: compute_tensor(b, rs, Criterion(), PAPER_SWEEP,
                                                                         want_rank=False),
             "compute_tensor, exact": lambda b, rs: compute_tensor(b, rs, Criterion("exact", 0.0), PAPER_SWEEP,
                                                                   want_rank=False),
             "compute_tensor, relative": lambda b, rs: compute_tensor(b, rs, Criterion("relative", 1e-3),
                                                                      PAPER_SWEEP, want_rank=False)}
    if args.compare_with:
        old = old_compute_tensor(args.compare_with)
        cases[f"compute_tensor at {args.compare_with}, paper sweep"] = lambda b, rs: old(
            b, rs, Criterion(), PAPER_SWEEP, want_rank=False)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, f in cases.items():
            start = time.perf_counter()
            for b, rs in data.values():
                f(b, rs)
            times[name].append(time.perf_counter() - start)
    anchor = statistics.median(times["mask pass"])
    print(f"{params / 1e6:.1f}M parameters x {args.runs} {args.dtype} runs, {torch.get_num_threads()} torch threads, "
          f"medians of {args.repeats}")
    print("| case | median s | × mask pass |\n|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {m / anchor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
