"""Precision visibility: which true updates survive a cast to bf16, and how far each is from that threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlsub_tui.criteria import ULP_BINS, ULP_LOG2_MAX, ULP_LOG2_MIN

BF16_MANTISSA_BITS = 7
_BF16_EPS = torch.finfo(torch.bfloat16).eps


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


def ulp_base_term(base: torch.Tensor) -> torch.Tensor:
    """For bf16 weights: max(e_w0, 1) − 7 + ULP_LOG2_MIN (biased exponent), what ulp_bins subtracts from e_Δ."""
    return torch.clamp(float_exponent(base), min=1) + (ULP_LOG2_MIN - BF16_MANTISSA_BITS)


class SharedBase:
    """The base's term of the current chunk, computed once for every run that compares in bf16 (it holds
    the chunk it was computed from, so an identity check cannot mistake another tensor for it)."""

    def __init__(self):
        self.chunk: torch.Tensor | None = None
        self.term: torch.Tensor | None = None

    def term_of(self, base: torch.Tensor) -> torch.Tensor:
        if self.chunk is not base:
            self.chunk, self.term = base, ulp_base_term(base)
        return self.term


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


def _bincount(x: torch.Tensor, minlength: int) -> np.ndarray:
    """Counts of small non-negative uint8 values (below 128: a pair of them must be a non-negative int16).

    On a CPU, bytes are counted two at a time (an int16 view: key = low + 256·high), then split: half
    as many increments, and fewer collisions on a few crowded bins, about twice as fast as one by one.
    """
    x = x.reshape(-1)
    if x.is_cuda or x.numel() < 2:
        return torch.bincount(x.long() if x.is_cuda else x, minlength=minlength).cpu().numpy()[:minlength]
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
        else:
            binned = torch.where(counted, ulp_bins(abs_delta, base) + 1, 0).to(torch.uint8)
        self.histogram += _bincount(binned, ULP_BINS + 1)[1:]  # bin 0: positions not counted
        if self.above:
            visible = bf16_visible(base, run)
            self.visible += int(torch.count_nonzero(visible))
            self.hidden += int(torch.count_nonzero(updated & ~visible))

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
        return PrecisionFigures(tuple(int(c) for c in self.histogram),
                                self.visible if self.above else None, self.hidden if self.above else None)

