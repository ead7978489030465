"""Time the mask map and Δ histogram of one large matrix (what keys 8 and 9 compute for the focused tensor)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlsub_tui.compute.matrix_detail import detail  # noqa: E402
from rlsub_tui.records.criteria import AnalysisOptions  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    base = (torch.randn(4096, 11008) * 0.02).to(torch.bfloat16)  # a Llama-7B-sized mlp matrix
    runs = []
    for _ in range(3):
        r = base.float().clone()
        moved = torch.rand(base.shape) < 0.2
        r[moved] += torch.randn(int(moved.sum())) * 1e-3
        runs.append(r.to(torch.bfloat16))
    start = time.perf_counter()
    d = detail("mlp.up_proj.weight", [base] + runs, AnalysisOptions(), (0, 1, 2))
    took = time.perf_counter() - start
    print(f"detail() on 4096x11008 bf16, 3 runs: {took:.2f} s (map {d.cell_numel.shape}, "
          f"{torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
