"""Pair overlaps for many runs: the Gram product (masks.pair_intersections) against K²/2 mask passes.

    python benchmarks/bench_pairs.py            # K = 16, 32, 64, 128 on one 4M-parameter chunk
"""

from __future__ import annotations

import time

import torch

from rlsub_tui.compute.kernels import CHUNK_ELEMENTS, GRAM_MIN_RUNS, nonzero, pair_intersections


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print("| K | Gram product | K²/2 mask passes | used by the engine |\n|---|---|---|---|")
    for k in (16, 32, 64, 128):
        masks = [torch.rand(CHUNK_ELEMENTS, generator=g) < 0.3 for _ in range(k)]
        t = time.perf_counter()
        gram = pair_intersections(masks)
        t_gram = time.perf_counter() - t
        t = time.perf_counter()
        loop = {(a, c): nonzero(masks[a] & masks[c]) for a in range(k) for c in range(a + 1, k)}
        t_loop = time.perf_counter() - t
        assert all(gram[a, c] == n for (a, c), n in loop.items())
        used = "Gram" if k >= GRAM_MIN_RUNS else "passes"
        print(f"| {k} | {t_gram:.2f} s | {t_loop:.2f} s | {used} |")


if __name__ == "__main__":
    main()
