"""An independent numpy computation of the numbers the engine reports, used as the answer key in tests."""

from __future__ import annotations

import numpy as np


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 (nearest, ties to even) and return them as float32."""
    f = np.asarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = (rounded & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), f, out)


def stored_delta(base: np.ndarray, run: np.ndarray, dtype: str) -> np.ndarray:
    """Δ in the stored dtype; inputs are the stored values as float32/float64 arrays."""
    if dtype == "bf16":
        return round_bf16(run.astype(np.float64) - base.astype(np.float64))
    if dtype == "fp16":
        return (run.astype(np.float16) - base.astype(np.float16)).astype(np.float32)
    return run.astype(np.float32) - base.astype(np.float32)


def tolerance_in(dtype: str, t: float) -> float:
    if dtype == "bf16":
        return float(round_bf16(np.array([t]))[0])
    if dtype == "fp16":
        return float(np.float16(t))
    return float(np.float32(t))


def mask(base: np.ndarray, run: np.ndarray, dtype: str, criterion: str = "atol", value: float = 1e-5) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        nonfinite = ~(np.isfinite(base) & np.isfinite(run))
        if criterion == "atol":
            d = stored_delta(base, run, dtype)
            m = ~(np.abs(d) <= tolerance_in(dtype, value))
        elif criterion == "exact":
            m = base != run
        else:
            m = ~(np.abs(run.astype(np.float64) - base.astype(np.float64))
                  <= value * np.maximum(np.abs(base), np.abs(run)).astype(np.float64))
    return m | nonfinite


def pooled(masks: list[list[np.ndarray]], deltas: list[list[np.ndarray]] | None = None) -> dict:
    """masks[k][t]: run k's mask on tensor t. Returns the pooled numbers the summary reports."""
    k = len(masks)
    flat = [np.concatenate([m.reshape(-1) for m in run]) for run in masks]
    n = flat[0].size
    out = {"numel": n, "updated": [int(f.sum()) for f in flat]}
    out["sparsity"] = [1 - u / n for u in out["updated"]]
    pairs = {}
    for a in range(k):
        for b in range(a + 1, k):
            both = int((flat[a] & flat[b]).sum())
            ua, ub = out["updated"][a], out["updated"][b]
            p, q = ua / n, ub / n
            pairs[(a, b)] = {
                "both": both, "o1": both / ua, "o2": both / ub, "o1_random": ub / n, "o2_random": ua / n,
                "jaccard": both / (ua + ub - both), "jaccard_random": p * q / (p + q - p * q),
            }
    out["pairs"] = pairs
    count = np.sum(np.stack(flat), axis=0)
    out["agreement"] = [int((count == j).sum()) for j in range(k + 1)]
    if deltas is not None:
        dflat = [np.concatenate([d.reshape(-1) for d in run]) for run in deltas]
        pos = np.sum(np.stack([f & (d > 0) for f, d in zip(flat, dflat)]), axis=0)
        neg = np.sum(np.stack([f & (d < 0) for f, d in zip(flat, dflat)]), axis=0)
        multi = count >= 2
        out["multi"] = int(multi.sum())
        out["sign_agree"] = int((multi & ((pos == count) | (neg == count))).sum())
    return out


def numpy_rank(delta: np.ndarray) -> int:
    """Rank with PyTorch's default rule, from numpy's float32 SVD."""
    d = delta.astype(np.float32)
    s = np.linalg.svd(d, compute_uv=False)
    if s.size == 0:
        return 0
    return int((s > s.max() * max(d.shape) * np.finfo(np.float32).eps).sum())


def exponent_stratum(base: np.ndarray, low: int = -25, high: int = 3) -> np.ndarray:
    """floor(log2 |w0|) clamped to [low, high], from np.frexp; zeros and subnormals get low - 1."""
    a = np.abs(base.astype(np.float32)).reshape(-1)
    _, e = np.frexp(a.astype(np.float64))
    out = np.clip(e - 1, low, high)
    return np.where(a < np.finfo(np.float32).tiny, low - 1, out)


def stratified_null(bases: list[np.ndarray], masks: list[list[np.ndarray]]) -> dict:
    """The stratified chance levels of science.md, by brute force: strata = tensor x exponent of |w0|;
    the agreement histogram enumerates every subset of runs in every stratum."""
    import itertools

    k = len(masks)
    strata = []  # (n_s, [a_s per run])
    for t, base in enumerate(bases):
        bins = exponent_stratum(base)
        for value in np.unique(bins):
            where = bins == value
            strata.append((int(where.sum()), [int(masks[r][t].reshape(-1)[where].sum()) for r in range(k)]))
    updated = [sum(s[1][r] for s in strata) for r in range(k)]
    pairs = {}
    for a in range(k):
        for b in range(a + 1, k):
            e = sum(sa[a] * sa[b] / n for n, sa in strata)
            pairs[(a, b)] = {"expected": e, "o1_random_strat": e / updated[a], "o2_random_strat": e / updated[b],
                             "jaccard_random_strat": e / (updated[a] + updated[b] - e)}
    chance = np.zeros(k + 1)
    for n, counts in strata:
        p = [c / n for c in counts]
        for subset in itertools.product([0, 1], repeat=k):
            chance[sum(subset)] += n * np.prod([p[r] if bit else 1 - p[r] for r, bit in enumerate(subset)])
    numel = sum(n for n, _ in strata)
    return {"pairs": pairs, "agreement_chance_strat": chance, "consensus_chance_strat": chance[k] / numel}
