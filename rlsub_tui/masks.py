"""Update masks: which parameters a run changed under a criterion, and the per-tensor counts built on them."""

from __future__ import annotations

import math

import numpy as np
import torch

from rlsub_tui.dtypes import dtype_name, dtypes_label
from rlsub_tui.precision import PrecisionAccumulator, SharedBase
from rlsub_tui.structure import LineAccumulator
from rlsub_tui.rank import stacked_rank_figures
from rlsub_tui.results import TensorResult
from rlsub_tui.spectrum import RankFigures

from rlsub_tui.criteria import MAG_BINS, MAG_X_MAX, MAG_X_MIN, MAX_SUBSET_RUNS, Criterion, RunTensorStats  # noqa: F401

CHUNK_ELEMENTS = 1 << 22  # elementwise work is done in chunks this size: cache-friendly, bounded memory
# On a GPU each chunk costs ~20 host syncs and ~90 kernel launches whatever its size: 2^26 elements ran
# the 151936x1536 embedding 3.6x faster than 2^22 on an H200 (BENCHMARKS.md), with ~2 GB of temporaries.
CUDA_CHUNK_ELEMENTS = 1 << 26


def chunk_elements(device: torch.device, k: int) -> int:
    """Elements per chunk: large on a GPU (fewer syncs), smaller there with many runs (K masks kept)."""
    if device.type != "cuda":
        return CHUNK_ELEMENTS
    return CUDA_CHUNK_ELEMENTS if k <= MAX_CODED_RUNS else CUDA_CHUNK_ELEMENTS >> 2
MAX_CODED_RUNS = 15  # up to this many runs, pair overlaps come from one histogram of per-parameter run codes
MAX_RUNS = 128  # per-parameter counters are int16; pair overlaps grow as K², so this is the supported K


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


def magnitude_table(shift: int = 0, device=None) -> torch.Tensor:
    """Bin of every float32 biased exponent 0..255 (see MAG_* above), times 2**shift."""
    biased = torch.arange(256, dtype=torch.int32)
    bins = (biased - 127).clamp(MAG_X_MIN, MAG_X_MAX) - (MAG_X_MIN - 1)
    bins[0] = 0  # zeros and subnormals
    return (bins << shift).to(device)


def magnitude_bins(base32: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Bin index of each |w0| (times 2**shift of `table`), looked up from its float32 exponent bits."""
    if table is None:
        table = magnitude_table(device=base32.device)
    return torch.index_select(table, 0, (base32.view(torch.int32) >> 23) & 0xFF)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """A threshold as the stored dtype represents it (bf16: 1e-5 -> 1.00136e-5), as torch.isclose compares."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return float(torch.tensor(value, dtype=torch.float32).to(dtype).float())
    return float(torch.tensor(value, dtype=dtype))


def _bincount(x: torch.Tensor, minlength: int) -> np.ndarray:
    """Histogram of small non-negative ints: numpy on the CPU (several times faster there), torch on a GPU."""
    if x.is_cuda:
        return torch.bincount(x.reshape(-1).long(), minlength=minlength).cpu().numpy()
    return np.bincount(x.reshape(-1).numpy(), minlength=minlength)


def _sum_sq(x: torch.Tensor) -> float:
    return float(torch.dot(x, x))


PAIR_BLOCK = 1 << 16  # positions per Gram block: counts stay far below 2**24, exact in float32
GRAM_MIN_RUNS = 32  # from this K the Gram product beats K²/2 mask passes (measured: 4x at K=64, slower at 16)


def pair_intersections(masks: list[torch.Tensor]) -> np.ndarray:
    """|A_a ∩ A_c| for every pair of K masks at once, as the Gram matrix M·Mᵀ of the 0/1 mask rows.

    One matrix product per block instead of K²/2 passes over the masks. Every partial sum is an
    integer below 2**24, so float32 (float64 on a GPU, where TF32 might be on) counts exactly.
    """
    k, n = len(masks), masks[0].numel()
    dtype = torch.float64 if masks[0].is_cuda else torch.float32
    total = torch.zeros((k, k), dtype=torch.float64, device=masks[0].device)
    for start in range(0, n, PAIR_BLOCK):
        rows = torch.stack([m[start:start + PAIR_BLOCK] for m in masks]).to(dtype)
        total += (rows @ rows.T).to(torch.float64)
    return total.round().to(torch.int64).cpu().numpy()


def _nonzero(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))  # far faster than mask.sum() on bool tensors


def criterion_mask(b: torch.Tensor, r: torch.Tensor, absd: torch.Tensor, criterion: Criterion, tol: float,
                   work: torch.dtype) -> torch.Tensor:
    """Updated under the criterion (NaN/Inf handled by the caller): |Δ| > tol in the stored dtype (atol), the
    stored values differ (exact), or |Δ| > η·max(|w0|, |w1|) in `work` precision (relative)."""
    if criterion.name == "atol":
        return absd > tol
    if criterion.name == "exact":
        return r != b
    bw, rw = b.to(work), r.to(work)
    return (rw - bw).abs() > criterion.value * torch.maximum(bw.abs(), rw.abs())


def compute_tensor(base: torch.Tensor, runs: list[torch.Tensor], criterion: Criterion,
                   sweep: tuple[float, ...] = (), want_rank: bool = True,
                   ranks: list[RankFigures | None] | None = None,
                   dtypes: list[torch.dtype] | None = None) -> TensorResult:
    """Masks, counts, pair overlaps, agreement and ranks for one tensor, as its record (named by the caller).

    `base` and every run must have one shape. `dtypes[j]` is the dtype run j is compared in (default:
    the base's); run j must already be in it, the base is cast to it chunk by chunk, so each run's
    numbers depend on its own pair alone. A position whose Δ is NaN/Inf counts as updated by that
    run and is left out of its Σ|Δ|, ‖Δ‖², ‖W0‖² and of the sign agreement.
    `ranks`, when given, are known ranks with their spectra (from the cache) and are not recomputed.
    Elementwise work runs over chunks of CHUNK_ELEMENTS, so temporaries stay small whatever the tensor.
    For up to MAX_CODED_RUNS runs each parameter gets a code (bit j set when run j updated it), and
    one histogram of (|w0| bin, code) per chunk yields updated counts by magnitude, every pair's
    overlap and the agreement histogram at once.
    """
    k = len(runs)
    dtypes = list(dtypes) if dtypes is not None else [base.dtype] * k
    works = [torch.float64 if dt == torch.float64 else torch.float32 for dt in dtypes]
    tols = [_rounded(criterion.value, dt) if criterion.name == "atol" else 0.0 for dt in dtypes]
    sweep_tols = [[_rounded(t, dt) for t in sweep] for dt in dtypes]
    flat_base = base.reshape(-1)
    flat_runs = [r.reshape(-1) for r in runs]
    n = flat_base.numel()
    dev = base.device
    coded = k <= MAX_CODED_RUNS
    code_dtype = torch.int16 if k < 16 else torch.int32

    updated = [0] * k
    nonfinite = [0] * k
    sum_abs = [0.0] * k
    sq_delta = [0.0] * k
    sq_base = [0.0] * k
    sweep_counts = [[0] * len(sweep) for _ in range(k)]
    joint = np.zeros(MAG_BINS << k if coded else 1, dtype=np.int64)  # (bin, code) histogram
    table = magnitude_table(k if coded else 0, dev)
    mag_numel = np.zeros(MAG_BINS, dtype=np.int64)
    mag_updated = [np.zeros(MAG_BINS, dtype=np.int64) for _ in range(k)]
    both = {(a, b): 0 for a in range(k) for b in range(a + 1, k)}
    agreement = np.zeros(k + 1, dtype=np.int64)
    multi = 0
    sign_agree = 0
    # issue 11 items 1 and 4: one precision and one row/column accumulator per run, fed each chunk
    shared_base = SharedBase()
    precision = [PrecisionAccumulator(dt, shared_base) for dt in dtypes]
    lines = [LineAccumulator(base.shape, dev) for _ in range(k)]

    chunk = chunk_elements(dev, k)
    for start in range(0, n, chunk):
        b = flat_base[start:start + chunk]
        bins = magnitude_bins(b.to(torch.float32), table)  # already shifted left by k when coded
        base_sq: dict[torch.dtype, float] = {}
        # int16: an int8 counter overflows past 127 runs (K is capped at MAX_RUNS in the engine)
        count = torch.zeros(b.shape, dtype=torch.int16, device=dev)
        signs = torch.zeros(b.shape, dtype=torch.int16, device=dev)
        code = torch.zeros(b.shape, dtype=code_dtype, device=dev) if coded else None
        unsigned = None  # positions whose Δ is NaN/Inf in some run: no sign to agree on
        masks = []
        for j, run in enumerate(flat_runs):
            r = run[start:start + chunk]
            bj = b if b.dtype == dtypes[j] else b.to(dtypes[j])
            work = works[j]
            d = stored_delta(bj, r).to(work)
            absd = d.abs()
            total = float(absd.sum())
            bad = 0
            if not math.isfinite(total):  # NaN/Inf in Δ (rare): zero it out, count as updated
                finite = torch.isfinite(d)
                bad = b.numel() - _nonzero(finite)
                d = torch.where(finite, d, torch.zeros_like(d))
                absd = d.abs()
                total = float(absd.sum())
                unsigned = ~finite if unsigned is None else unsigned | ~finite
                sq_base[j] += _sum_sq(torch.where(finite, bj.to(work), torch.zeros_like(d)))
            else:
                if dtypes[j] not in base_sq:
                    base_sq[dtypes[j]] = _sum_sq(bj.to(work))
                sq_base[j] += base_sq[dtypes[j]]
            mask = criterion_mask(bj, r, absd, criterion, tols[j], work)
            if bad:
                mask |= ~finite
                nonfinite[j] += bad
            updated[j] += _nonzero(mask)
            precision[j].add(bj, r, absd, mask, finite if bad else None)  # issue 11 item 1
            lines[j].add(mask, start)  # issue 11 item 4
            for i, t in enumerate(sweep_tols[j]):
                sweep_counts[j][i] += _nonzero(absd > t) + bad
            sum_abs[j] += total
            sq_delta[j] += float(torch.dot(d, d))
            count += mask
            signs += torch.sign(d).to(torch.int16) * mask
            if coded:
                code |= mask.to(code_dtype) << j
            else:
                masks.append(mask)
                mag_updated[j] += _bincount(bins[mask], MAG_BINS)
        several = count >= 2
        if unsigned is not None:
            several &= ~unsigned
        multi += _nonzero(several)
        sign_agree += _nonzero(several & (signs.abs() == count))
        if coded:
            joint += _bincount(bins | code.to(torch.int32), MAG_BINS << k)
        else:
            mag_numel += _bincount(bins, MAG_BINS)
            agreement += _bincount(count, k + 1)
            if k >= GRAM_MIN_RUNS:
                inter = pair_intersections(masks)
                for (a, c) in both:
                    both[(a, c)] += int(inter[a, c])
            else:
                for (a, c) in both:
                    both[(a, c)] += _nonzero(masks[a] & masks[c])

    if coded:
        table = joint.reshape(MAG_BINS, 1 << k)
        mag_numel = table.sum(axis=1)
        by_code = table.sum(axis=0)
        codes = np.arange(1 << k)
        bits = [(codes >> j) & 1 == 1 for j in range(k)]
        for j in range(k):
            mag_updated[j] = table[:, bits[j]].sum(axis=1)
        for (a, c) in both:
            both[(a, c)] = int(by_code[bits[a] & bits[c]].sum())
        popcount = np.array([bin(c).count("1") for c in codes])
        agreement = np.bincount(popcount, weights=by_code, minlength=k + 1).astype(np.int64)

    stats: list[RunTensorStats] = []
    rank_note = None
    for j, run in enumerate(runs):
        rank = ranks[j] if ranks is not None else None
        if rank is None and want_rank and base.ndim in (2, 3):
            if nonfinite[j]:
                rank_note = "rank not computed: NaN/Inf in the update"
            else:
                bj = base if base.dtype == dtypes[j] else base.to(dtypes[j])
                rank = stacked_rank_figures(stored_delta(bj, run))
        stats.append(RunTensorStats(
            updated=updated[j], nonfinite=nonfinite[j], sum_abs_delta=sum_abs[j], sq_delta=sq_delta[j],
            sq_base=sq_base[j], sweep=sweep_counts[j], dtype=dtype_name(dtypes[j]),
            magnitude_updated=[int(x) for x in mag_updated[j]],
        ))
        stats[-1].set_rank(rank)
        _set_precision_and_lines(stats[-1], precision[j].finish(), lines[j].finish())  # issue 11 items 1, 4
    return TensorResult(
        name="", dtype=dtypes_label(dtypes), shape=list(base.shape), numel=n,  # the caller names it
        runs=stats, both=both, agreement=[int(x) for x in agreement], multi=multi, sign_agree=sign_agree,
        magnitude_numel=[int(x) for x in mag_numel], notes=[rank_note] if rank_note else [],
        run_codes=[int(x) for x in by_code] if coded and k <= MAX_SUBSET_RUNS else [],
    )


def _set_precision_and_lines(stats: RunTensorStats, figures, counts) -> None:
    """Copy a run's precision.PrecisionFigures and structure.LineCounts (either may be None) into its stats."""
    if figures is not None:
        stats.ulp_histogram = list(figures.ulp_histogram)
        stats.updated_bf16_visible, stats.hidden_by_bf16 = figures.visible, figures.hidden
    if counts is not None:
        stats.rows_updated, stats.cols_updated = counts.rows, counts.cols


def update_mask(base: torch.Tensor, run: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """Which parameters count as updated (a bool tensor of base's shape), by the same rule as compute_tensor.

    `base` and `run` share one shape and one dtype. NaN/Inf in the update count as updated.
    """
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    tol = _rounded(criterion.value, base.dtype) if criterion.name == "atol" else 0.0
    out = torch.empty(base.shape, dtype=torch.bool, device=base.device)
    flat_out, flat_base, flat_run = out.reshape(-1), base.reshape(-1), run.reshape(-1)
    for start in range(0, flat_base.numel(), CHUNK_ELEMENTS):
        b = flat_base[start:start + CHUNK_ELEMENTS]
        r = flat_run[start:start + CHUNK_ELEMENTS]
        d = stored_delta(b, r).to(work)
        mask = criterion_mask(b, r, d.abs(), criterion, tol, work)
        flat_out[start:start + CHUNK_ELEMENTS] = mask | ~torch.isfinite(d)
    return out
