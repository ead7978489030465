"""Precision visibility: which true updates survive a cast to bf16, and how far each is from that threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlsub_tui.compute.kernels import criterion_mask, nonzero, rounded, stored_delta
from rlsub_tui.records.criteria import ULP_BINS, ULP_LOG2_MAX, ULP_LOG2_MIN, Criterion
from rlsub_tui.util import device_route

BF16_MANTISSA_BITS = 7
_BF16_EPS = torch.finfo(torch.bfloat16).eps

# floor(log2(|Δ| / ULP_bf16(w0))) = e_Δ − max(e_w0, 1) + 7 for a normal Δ, e the biased float32 exponents. Where
# whole chunks are counted at once it comes from one key per position: DELTA_CODE + e_Δ for a finite true
# update (else 0) plus BASE_CODE − max(e_w0, 1), i.e. DISTANCE_ZERO + e_Δ − max(e_w0, 1); keys below DELTA_CODE
# are positions not counted. A histogram of DISTANCE_KEYS keys holds every case; distance_bins() bins it.
DELTA_CODE = 512
BASE_CODE = 255
DISTANCE_ZERO = DELTA_CODE + BASE_CODE
DISTANCE_KEYS = DELTA_CODE + 254 + BASE_CODE  # e_Δ ≤ 254 (finite), max(e_w0, 1) ≥ 1


def distance_bins(keys: np.ndarray) -> np.ndarray:
    """The distance-to-visibility histogram (criteria.ULP_* bins) from a histogram of distance keys: bin =
    e_Δ − max(e_w0, 1) + 7 − ULP_LOG2_MIN, clamped to the end bins, as ulp_bins gives per value."""
    counted = np.arange(DELTA_CODE, DISTANCE_KEYS)
    bins = np.clip(counted - DISTANCE_ZERO + BF16_MANTISSA_BITS - ULP_LOG2_MIN, 0, ULP_BINS - 1)
    return np.bincount(bins, weights=keys[DELTA_CODE:], minlength=ULP_BINS).astype(np.int64)


def above_bf16(dtype: torch.dtype) -> bool:
    """A floating dtype finer than bf16 (fp16, fp32, fp64): its pairs have updates that bf16 may hide."""
    return dtype.is_floating_point and torch.finfo(dtype).eps < _BF16_EPS


def applies(dtype: torch.dtype) -> bool:
    """Pairs compared in bf16 or finer get the ULP histogram (fp8 pairs do not)."""
    return dtype == torch.bfloat16 or above_bf16(dtype)


def float_exponent(t: torch.Tensor) -> torch.Tensor:
    """The biased binary exponent (0..255) of each value as a float32 holds it; bf16 shares float32's."""
    if t.dtype == torch.bfloat16:
        return (t.view(torch.int16) >> 7) & 0xFF
    return (t.to(torch.float32).view(torch.int32) >> 23) & 0xFF


def ulp_log2(abs_delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """floor(log2(|Δ| / ULP_bf16(w0))) per position, exactly: ULP_bf16 is a power of two, so this is
    floor(log2 |Δ|) (frexp, subnormals included) minus log2 ULP_bf16(w0) (from w0's exponent bits).

    ULP_bf16(w) = 2^(floor(log2 |w|) − 7) for a normal w; zeros and subnormals take the subnormal
    spacing 2^-133, i.e. the biased exponent 1.
    """
    _, delta_exp = torch.frexp(abs_delta)  # |Δ| = m·2^e, m in [0.5, 1): floor(log2 |Δ|) = e − 1
    spacing_exp = torch.clamp(float_exponent(base), min=1)  # log2 ULP_bf16(w0) = spacing_exp − 127 − 7
    return delta_exp.to(torch.int32) - 1 - (spacing_exp.to(torch.int32) - 127 - BF16_MANTISSA_BITS)


def base_key_term(base: torch.Tensor) -> np.ndarray:
    """The base's part of the distance key, BASE_CODE − max(e_w0, 1), per position (int64, CPU; flat)."""
    return BASE_CODE - np.maximum(float_exponent(base).reshape(-1).numpy().astype(np.int64), 1)


def ulp_base_term(base: torch.Tensor) -> torch.Tensor:
    """For bf16 weights: max(e_w0, 1) − 7 + ULP_LOG2_MIN (biased exponent), what ulp_bins subtracts from e_Δ."""
    return torch.clamp(float_exponent(base), min=1) + (ULP_LOG2_MIN - BF16_MANTISSA_BITS)


class SharedBase:
    """The base's per-chunk terms, computed once for every run of the chunk that needs them (each held with the
    chunk it was computed from, so an identity check cannot mistake another tensor for it)."""

    def __init__(self):
        self._of: dict[str, tuple[torch.Tensor, object]] = {}

    def _per_chunk(self, what: str, base: torch.Tensor, compute):
        held = self._of.get(what)
        if held is None or held[0] is not base:
            held = self._of[what] = (base, compute(base))
        return held[1]

    def term_of(self, base: torch.Tensor) -> torch.Tensor:
        return self._per_chunk("ulp", base, ulp_base_term)

    def key_term_of(self, base: torch.Tensor) -> np.ndarray:
        return self._per_chunk("key", base, base_key_term)

    def bf16_of(self, base: torch.Tensor) -> torch.Tensor:
        return self._per_chunk("bf16", base, lambda b: b.to(torch.bfloat16))


def ulp_bins(abs_delta: torch.Tensor, base: torch.Tensor, shared: SharedBase | None = None) -> torch.Tensor:
    """The histogram bin (0..ULP_BINS-1) of each position's floor(log2(|Δ| / ULP_bf16(w0))).

    bf16 pairs take a shortcut (the analysis' hot path, see _bf16_bins): Δ is a bf16 value, so its
    exponent bits give floor(log2 |Δ|), except that a subnormal Δ (below 2^-126, only between subnormal
    or zero weights) counts as 2^-127. Other dtypes go through frexp, exact for every value.
    """
    if base.dtype != torch.bfloat16:
        return torch.clamp(ulp_log2(abs_delta, base), ULP_LOG2_MIN, ULP_LOG2_MAX) - ULP_LOG2_MIN
    term = shared.term_of(base) if shared is not None else ulp_base_term(base)
    out = torch.empty(abs_delta.shape, dtype=torch.int16, device=abs_delta.device)
    return _bf16_bins(abs_delta, term, out)


def _bf16_bins(abs_delta: torch.Tensor, term: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ulp_bins for bf16 pairs, written into `out` (int16) in place: a fresh tensor per step costs more in
    page faults than the arithmetic itself on a CPU."""
    out.view(torch.bfloat16).copy_(abs_delta)  # exact: Δ of bf16 values is a bf16 value
    out.bitwise_right_shift_(7).sub_(term)  # |Δ| ≥ 0, so the shift leaves e_Δ; minus the base's term
    return out.clamp_(0, ULP_BINS - 1)


def bf16_visible(base: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """bf16(θ1) ≠ bf16(θ0), both rounded to nearest even (torch's cast)."""
    return base.to(torch.bfloat16) != run.to(torch.bfloat16)


def bf16_values_differ(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """a != b for two bf16 CPU tensors, as values (so +0 = −0 and NaN differs from everything), compared as
    bit patterns in numpy: torch compares bf16 values several times slower on one CPU thread."""
    x, y = a.reshape(-1).view(torch.int16).numpy(), b.reshape(-1).view(torch.int16).numpy()
    differ = x != y
    differ &= ((x | y) & 0x7FFF) != 0  # +0 and −0 are one value
    differ |= (x & 0x7FFF) > 0x7F80  # NaN (exponent all ones, mantissa non-zero) differs from anything
    differ |= (y & 0x7FFF) > 0x7F80
    return differ


def _bincount(x: torch.Tensor, minlength: int) -> np.ndarray:
    """Counts of small non-negative uint8 values (below 128: a pair of them must be a non-negative int16).

    On a CPU, bytes are counted two at a time (an int16 view: key = low + 256·high), then split: half
    as many increments, and fewer collisions on a few crowded bins, about twice as fast as one by one.
    """
    x = x.reshape(-1)
    if device_route.cuda_route(x.device.type) or x.numel() < 2:
        return torch.bincount(x.long(), minlength=minlength).cpu().numpy()[:minlength]
    even = x.numel() - x.numel() % 2
    pairs = torch.bincount(x[:even].view(torch.int16), minlength=256 * minlength).numpy()
    grid = pairs[:256 * minlength].reshape(minlength, 256)
    counts = grid.sum(axis=0)[:minlength] + grid.sum(axis=1)
    if even < x.numel():
        counts[int(x[-1])] += 1
    return counts


@dataclass(frozen=True)
class PrecisionFigures:
    """One run's precision figures on one tensor. visible/hidden are None unless the pair is finer than bf16."""

    ulp_histogram: tuple[int, ...]  # true updates per bin of floor(log2(|Δ| / ULP_bf16(w0))) (criteria.ULP_*)
    visible: int | None  # positions with bf16(θ1) ≠ bf16(θ0)
    hidden: int | None  # true updates with bf16(θ1) = bf16(θ0)


class PrecisionAccumulator:
    """Counts for one run and tensor, one chunk at a time: add() each chunk, finish() once."""

    def __init__(self, dtype: torch.dtype, shared: SharedBase | None = None):
        self.shared = shared  # one per compute_tensor call: the runs share the base's exponent work
        self._work: torch.Tensor | None = None
        self._bytes: torch.Tensor | None = None
        self.applies = applies(dtype)
        self.above = above_bf16(dtype)
        self.histogram = np.zeros(ULP_BINS, dtype=np.int64)
        self.keys = np.zeros(DISTANCE_KEYS, dtype=np.int64)  # the float32 path's distance keys (distance_bins)
        self.visible = 0
        self.hidden = 0

    def add(self, base: torch.Tensor, run: torch.Tensor, abs_delta: torch.Tensor, updated: torch.Tensor,
            finite: torch.Tensor | None = None) -> None:
        """One chunk: base and run in the pair's dtype, |Δ| (NaN/Inf zeroed), the true-update mask and, when
        some Δ is NaN/Inf, where Δ is finite (a NaN/Inf Δ has no distance to show)."""
        if not self.applies:
            return
        counted = updated if finite is None else updated & finite
        if base.dtype == torch.bfloat16:
            binned = self._bf16_binned(base, abs_delta, counted)
            self.histogram += _bincount(binned, ULP_BINS + 1)[1:]  # bin 0: positions not counted
        elif not self._add_keys(base, abs_delta, counted):
            binned = torch.where(counted, ulp_bins(abs_delta, base) + 1, 0).to(torch.uint8)
            self.histogram += _bincount(binned, ULP_BINS + 1)[1:]
        if self.above:
            base_bf16 = (self.shared or SharedBase()).bf16_of(base)  # the base cast once per chunk
            if device_route.cuda_route(base.device.type):
                visible = base_bf16 != run.to(torch.bfloat16)  # bf16_visible
                self.visible += int(torch.count_nonzero(visible))
                self.hidden += int(torch.count_nonzero(updated & ~visible))
            else:
                visible = bf16_values_differ(base_bf16, run.to(torch.bfloat16))
                self.visible += int(np.count_nonzero(visible))
                self.hidden += int(np.count_nonzero(updated.reshape(-1).numpy() & ~visible))

    def _add_keys(self, base, abs_delta, counted) -> bool:
        """float32 |Δ| on the CPU: floor(log2 |Δ|) from its exponent bits, exact for normal values, counted as
        distance keys (in numpy: torch's mixed-type elementwise ops run several times slower on one CPU thread).
        False (nothing counted) on a GPU, for float64 and when a counted |Δ| is subnormal."""
        if abs_delta.dtype != torch.float32 or device_route.cuda_route(abs_delta.device.type):
            return False
        exponent = abs_delta.reshape(-1).numpy().view(np.int32) >> 23  # |Δ| ≥ 0 (NaN/Inf zeroed): sign bit 0
        counted = counted.reshape(-1).numpy() & (exponent < 255)  # a NaN/Inf left in has no distance to count
        if np.count_nonzero(counted & (exponent == 0)):  # subnormal |Δ| (counted ones are non-zero): frexp instead
            return False
        key = (exponent + DELTA_CODE) * counted
        key += (self.shared or SharedBase()).key_term_of(base)
        self.keys += np.bincount(key, minlength=DISTANCE_KEYS)
        return True

    def _bf16_binned(self, base, abs_delta, counted) -> torch.Tensor:
        """1 + bin where counted, else 0, as uint8, in buffers kept from chunk to chunk."""
        n = abs_delta.numel()
        if self._work is None or self._work.numel() < n or self._work.device != abs_delta.device:
            self._work = torch.empty(n, dtype=torch.int16, device=abs_delta.device)
            self._bytes = torch.empty(n, dtype=torch.uint8, device=abs_delta.device)
        term = self.shared.term_of(base) if self.shared is not None else ulp_base_term(base)
        bins = _bf16_bins(abs_delta.reshape(-1), term.reshape(-1), self._work[:n])
        bins.add_(1).mul_(counted.reshape(-1))
        return self._bytes[:n].copy_(bins)

    def finish(self) -> PrecisionFigures | None:
        if not self.applies:
            return None
        self.histogram += distance_bins(self.keys)
        self.keys[:] = 0
        return PrecisionFigures(tuple(int(c) for c in self.histogram),
                                self.visible if self.above else None, self.hidden if self.above else None)



@dataclass(frozen=True)
class TrueUpdateFigures:
    """One run's true updates on one tensor, counted in its stored precision, with their bf16 visibility."""

    true: int  # positions updated under the criterion in the stored precision (a NaN/Inf Δ counts)
    visible: int  # positions with bf16(θ1) ≠ bf16(θ0)
    hidden: int  # true updates with bf16(θ1) = bf16(θ0)


class TrueUpdates:
    """A run stored finer than bf16 but compared in a coarser dtype: its true updates counted on the same chunks
    in the stored precision `dtype` (the finer of the pair, the base cast up exactly), as if compared there."""

    def __init__(self, dtype: torch.dtype, criterion: Criterion):
        self.dtype, self.criterion = dtype, criterion
        self.work = torch.float64 if dtype == torch.float64 else torch.float32
        self.tol = rounded(criterion.value, dtype) if criterion.name == "atol" else 0.0
        self.true = self.visible = self.hidden = 0

    def add(self, base: torch.Tensor, run: torch.Tensor) -> None:
        """One chunk of the base and the run, each as stored."""
        b = base if base.dtype == self.dtype else base.to(self.dtype)
        r = run if run.dtype == self.dtype else run.to(self.dtype)
        d = stored_delta(b, r).to(self.work)
        finite = torch.isfinite(d)
        absd = torch.where(finite, d, torch.zeros_like(d)).abs()
        updated = criterion_mask(b, r, absd, self.criterion, self.tol, self.work) | ~finite
        base_bf16, run_bf16 = b.to(torch.bfloat16), r.to(torch.bfloat16)
        if device_route.cuda_route(b.device.type):
            visible = base_bf16 != run_bf16  # bf16_visible
            self.visible += nonzero(visible)
            self.hidden += nonzero(updated & ~visible)
        else:
            visible_np = bf16_values_differ(base_bf16, run_bf16)
            self.visible += int(np.count_nonzero(visible_np))
            self.hidden += int(np.count_nonzero(updated.reshape(-1).numpy() & ~visible_np))
        self.true += nonzero(updated)

    def finish(self) -> TrueUpdateFigures:
        return TrueUpdateFigures(self.true, self.visible, self.hidden)
