"""Update masks: which parameters a run changed under a criterion, and the per-tensor counts built on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlsub_tui.errors import InputError
from rlsub_tui.rank import update_rank

CRITERIA = ("atol", "exact", "relative")
# |w0| magnitude bins for "which weights changed": bin 0 holds zeros, bins 1.. hold
# exponents MAG_MIN_EXP..MAG_MAX_EXP of |w0| = m * 2**e (m in [0.5, 1)), clamped at both ends.
MAG_MIN_EXP = -24
MAG_MAX_EXP = 4
MAG_BINS = MAG_MAX_EXP - MAG_MIN_EXP + 2


@dataclass(frozen=True)
class Criterion:
    """What counts as updated. `value` is the tolerance (atol) or eta (relative); unused for exact."""

    name: str = "atol"
    value: float = 1e-5

    def __post_init__(self):
        if self.name not in CRITERIA:
            raise InputError(f"unknown criterion '{self.name}'; choose one of {', '.join(CRITERIA)}.")
        if self.name != "exact" and (not math.isfinite(self.value) or self.value < 0):
            raise InputError(f"the {self.name} threshold must be a finite number >= 0, not {self.value}.")

    def describe(self) -> str:
        if self.name == "atol":
            return f"atol {self.value:g}"
        if self.name == "relative":
            return f"relative eta {self.value:g}"
        return "exact"


@dataclass
class RunTensorStats:
    """One run's numbers on one tensor."""

    updated: int
    nonfinite: int
    sum_abs_delta: float
    sq_delta: float
    sq_base: float
    sweep: list[int] = field(default_factory=list)
    rank: int | None = None
    magnitude_updated: list[int] = field(default_factory=list)


def compare_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two floating dtypes (larger machine epsilon): the stated rule for mixed dtypes."""
    if a == b:
        return a
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _arith_dtype(dtype: torch.dtype) -> torch.dtype:
    # float8 has no arithmetic kernels: subtract in float32, then round to float8, which is what
    # bf16/fp16 kernels do internally too.
    return torch.float32 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dtype


def stored_delta(base: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """Δ = run - base computed in the (common) stored dtype, as the reference does."""
    arith = _arith_dtype(base.dtype)
    if arith != base.dtype:
        return (run.to(arith) - base.to(arith)).to(base.dtype).to(arith)
    return run - base


def updated_mask(base: torch.Tensor, run: torch.Tensor, delta: torch.Tensor, nonfinite: torch.Tensor,
                 criterion: Criterion) -> torch.Tensor:
    """Boolean mask of updated parameters; NaN/Inf in either checkpoint always counts as updated."""
    if criterion.name == "atol":
        # Compared in delta's dtype: the tolerance is rounded to it (bf16: 1e-5 -> 1.00136e-5), and a
        # delta equal to that rounded value is *not* updated, exactly like torch.isclose(delta, 0, atol).
        mask = ~(delta.abs() <= criterion.value)
    elif criterion.name == "exact":
        mask = run != base
    else:
        wide = torch.float64 if base.dtype == torch.float64 else torch.float32
        b, r = base.to(wide), run.to(wide)
        limit = torch.maximum(b.abs(), r.abs()) * criterion.value
        mask = ~((r - b).abs() <= limit)
    return mask | nonfinite


def magnitude_bins(base: torch.Tensor) -> torch.Tensor:
    """Bin index of each |w0| by binary exponent (see MAG_* above)."""
    w = base.float().abs()
    exp = torch.frexp(w).exponent.clamp(MAG_MIN_EXP, MAG_MAX_EXP) - MAG_MIN_EXP + 1
    return torch.where(w == 0, torch.zeros_like(exp), exp).reshape(-1).long()


@dataclass
class TensorComputation:
    """Every count for one tensor across K runs (the engine turns it into a TensorResult)."""

    runs: list[RunTensorStats]
    both: dict[tuple[int, int], int]
    agreement: list[int]
    multi: int
    sign_agree: int
    magnitude_numel: list[int]
    rank_note: str | None = None


def compute_tensor(base: torch.Tensor, runs: list[torch.Tensor], criterion: Criterion,
                   sweep: tuple[float, ...] = (), want_rank: bool = True,
                   ranks: list[int | None] | None = None) -> TensorComputation:
    """Masks, counts, pair overlaps, agreement and ranks for one tensor.

    `base` and every run must have one shape and one dtype (the engine casts mixed dtypes first).
    `ranks`, when given, are known ranks (from the cache) and are not recomputed.
    """
    k = len(runs)
    base_finite = torch.isfinite(base) if base.is_floating_point() else None
    mags = magnitude_bins(base)
    magnitude_numel = torch.bincount(mags, minlength=MAG_BINS).tolist()
    masks: list[torch.Tensor] = []
    count = torch.zeros(base.shape, dtype=torch.uint8, device=base.device)
    positive = torch.zeros_like(count)
    negative = torch.zeros_like(count)
    stats: list[RunTensorStats] = []
    rank_note = None
    for idx, run in enumerate(runs):
        delta = stored_delta(base, run)
        nonfinite = ~(base_finite & torch.isfinite(run))
        n_nonfinite = int(nonfinite.sum())
        mask = updated_mask(base, run, delta, nonfinite, criterion)
        absd = delta.abs()
        sweep_counts = [int((~(absd <= t) | nonfinite).sum()) for t in sweep]
        if n_nonfinite:
            clean_delta = torch.where(nonfinite, torch.zeros_like(delta), delta)
            clean_base = torch.where(torch.isfinite(base), base, torch.zeros_like(base))
        else:
            clean_delta, clean_base = delta, base
        d64 = clean_delta.to(torch.float64)
        rank = None
        if ranks is not None and ranks[idx] is not None:
            rank = ranks[idx]
        elif want_rank and base.ndim == 2:
            if n_nonfinite:
                rank_note = "rank not computed: NaN/Inf in the update"
            else:
                rank = update_rank(delta)
        stats.append(RunTensorStats(
            updated=int(mask.sum()),
            nonfinite=n_nonfinite,
            sum_abs_delta=float(d64.abs().sum()),
            sq_delta=float((d64 * d64).sum()),
            sq_base=float(clean_base.to(torch.float64).pow(2).sum()),
            sweep=sweep_counts,
            rank=rank,
            magnitude_updated=torch.bincount(mags[mask.reshape(-1)], minlength=MAG_BINS).tolist(),
        ))
        del d64, absd
        count += mask
        positive += mask & (delta > 0)
        negative += mask & (delta < 0)
        masks.append(mask)
    both = {}
    for a in range(k):
        for b in range(a + 1, k):
            both[(a, b)] = int((masks[a] & masks[b]).sum())
    agreement = torch.bincount(count.reshape(-1).long(), minlength=k + 1).tolist()
    multi_mask = count >= 2
    same_sign = (positive == count) | (negative == count)
    return TensorComputation(
        runs=stats,
        both=both,
        agreement=agreement,
        multi=int(multi_mask.sum()),
        sign_agree=int((multi_mask & same_sign).sum()),
        magnitude_numel=magnitude_numel,
        rank_note=rank_note,
    )
