"""Update masks: which parameters a run changed under a criterion, and the per-tensor counts built on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rlsub_tui.errors import InputError
from rlsub_tui.rank import update_rank

CRITERIA = ("atol", "exact", "relative")
# |w0| magnitude bins for "which weights changed": bin 0 holds zeros (and subnormals), bin b >= 1 holds
# |w0| in [2^x, 2^(x+1)) with x = MAG_X_MIN + b - 1, clamped to [MAG_X_MIN, MAG_X_MAX] at both ends.
MAG_X_MIN = -25
MAG_X_MAX = 3
MAG_BINS = MAG_X_MAX - MAG_X_MIN + 2
CHUNK_ELEMENTS = 1 << 22  # elementwise work is done in chunks this size: cache-friendly, bounded memory
MAX_CODED_RUNS = 16  # up to this many runs, pair overlaps come from one histogram of per-parameter run codes


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


def magnitude_bins(base32: torch.Tensor) -> torch.Tensor:
    """Bin index of each |w0| from its float32 exponent bits (see MAG_* above)."""
    biased = (base32.view(torch.int32) >> 23) & 0xFF
    bins = (biased - 127).clamp_(MAG_X_MIN, MAG_X_MAX) - (MAG_X_MIN - 1)
    return torch.where(biased == 0, torch.zeros_like(bins), bins)


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


def _rounded(value: float, dtype: torch.dtype) -> float:
    """A threshold as the stored dtype represents it (bf16: 1e-5 -> 1.00136e-5), as torch.isclose compares."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return float(torch.tensor(value, dtype=torch.float32).to(dtype).float())
    return float(torch.tensor(value, dtype=dtype))


def compute_tensor(base: torch.Tensor, runs: list[torch.Tensor], criterion: Criterion,
                   sweep: tuple[float, ...] = (), want_rank: bool = True,
                   ranks: list[int | None] | None = None) -> TensorComputation:
    """Masks, counts, pair overlaps, agreement and ranks for one tensor.

    `base` and every run must have one shape and one dtype (the engine casts mixed dtypes first).
    `ranks`, when given, are known ranks (from the cache) and are not recomputed.
    Elementwise work runs over chunks of CHUNK_ELEMENTS, so temporaries stay small whatever the tensor.
    """
    k = len(runs)
    dtype = base.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    tol = _rounded(criterion.value, dtype) if criterion.name == "atol" else 0.0
    sweep_tols = [_rounded(t, dtype) for t in sweep]
    flat_base = base.reshape(-1)
    flat_runs = [r.reshape(-1) for r in runs]
    n = flat_base.numel()
    dev = base.device

    updated = [0] * k
    nonfinite = [0] * k
    sum_abs = [0.0] * k
    sq_delta = [0.0] * k
    sq_base = 0.0
    sweep_counts = [[0] * len(sweep) for _ in range(k)]
    mag_numel = torch.zeros(MAG_BINS, dtype=torch.int64, device=dev)
    mag_updated = [torch.zeros(MAG_BINS, dtype=torch.int64, device=dev) for _ in range(k)]
    coded = k <= MAX_CODED_RUNS
    code_hist = torch.zeros(1 << k if coded else 1, dtype=torch.int64, device=dev)
    both = {(a, b): 0 for a in range(k) for b in range(a + 1, k)}
    agreement = torch.zeros(k + 1, dtype=torch.int64, device=dev)
    multi = 0
    sign_agree = 0

    for start in range(0, max(n, 1), CHUNK_ELEMENTS):
        b = flat_base[start:start + CHUNK_ELEMENTS]
        if b.numel() == 0:
            break
        b32 = b.to(torch.float32)
        bins = magnitude_bins(b32)
        mag_numel += torch.bincount(bins, minlength=MAG_BINS)
        sq_base += float(torch.sum(torch.nan_to_num(b32, nan=0.0, posinf=0.0, neginf=0.0) ** 2,
                                   dtype=torch.float64))
        count = torch.zeros(b.shape, dtype=torch.int8, device=dev)
        signs = torch.zeros(b.shape, dtype=torch.int8, device=dev)
        code = torch.zeros(b.shape, dtype=torch.int32, device=dev) if coded else None
        masks = []
        for j, run in enumerate(flat_runs):
            r = run[start:start + CHUNK_ELEMENTS]
            d = stored_delta(b, r).to(work)
            finite = torch.isfinite(d)  # Δ is NaN/Inf exactly where base or run is (or Δ overflows)
            bad = b.numel() - int(finite.sum())
            if bad:
                d = torch.where(finite, d, torch.zeros_like(d))
            absd = d.abs()
            if criterion.name == "atol":
                mask = absd > tol
            elif criterion.name == "exact":
                mask = r != b
            else:
                bw, rw = b.to(work), r.to(work)
                mask = (rw - bw).abs() > criterion.value * torch.maximum(bw.abs(), rw.abs())
            if bad:
                mask |= ~finite
                nonfinite[j] += bad
            updated[j] += int(mask.sum())
            for i, t in enumerate(sweep_tols):
                sweep_counts[j][i] += int((absd > t).sum()) + bad
            sum_abs[j] += float(torch.sum(absd, dtype=torch.float64))
            sq_delta[j] += float(torch.sum(d * d, dtype=torch.float64))
            mag_updated[j] += torch.bincount(bins[mask], minlength=MAG_BINS)
            count += mask
            signs += torch.sign(d).to(torch.int8) * mask
            if coded:
                code |= mask.to(torch.int32) << j
            else:
                masks.append(mask)
        agreement += torch.bincount(count.to(torch.int64), minlength=k + 1)
        several = count >= 2
        multi += int(several.sum())
        sign_agree += int((several & (signs.abs() == count)).sum())
        if coded:
            code_hist += torch.bincount(code.to(torch.int64), minlength=1 << k)
        else:
            for (a, c) in both:
                both[(a, c)] += int((masks[a] & masks[c]).sum())

    if coded and k > 1:
        hist = code_hist.cpu().numpy()
        codes = np.arange(1 << k)
        for (a, c) in both:
            both[(a, c)] = int(hist[((codes >> a) & 1 & (codes >> c)).astype(bool)].sum())

    stats: list[RunTensorStats] = []
    rank_note = None
    for j, run in enumerate(runs):
        rank = ranks[j] if ranks is not None else None
        if rank is None and want_rank and base.ndim == 2:
            if nonfinite[j]:
                rank_note = "rank not computed: NaN/Inf in the update"
            else:
                rank = update_rank(stored_delta(base, run))
        stats.append(RunTensorStats(
            updated=updated[j], nonfinite=nonfinite[j], sum_abs_delta=sum_abs[j], sq_delta=sq_delta[j],
            sq_base=sq_base, sweep=sweep_counts[j], rank=rank,
            magnitude_updated=mag_updated[j].tolist(),
        ))
    return TensorComputation(
        runs=stats, both=both, agreement=agreement.tolist(), multi=multi, sign_agree=sign_agree,
        magnitude_numel=mag_numel.tolist(), rank_note=rank_note,
    )
