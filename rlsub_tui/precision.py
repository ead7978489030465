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
        return (t.view(torch.int16).to(torch.int32) >> 7) & 0xFF
    return (t.to(torch.float32).view(torch.int32) >> 23) & 0xFF


def ulp_log2(abs_delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """floor(log2(|Δ| / ULP_bf16(w0))) per position, exactly: ULP_bf16 is a power of two, so this is
    floor(log2 |Δ|) (frexp, subnormals included) minus log2 ULP_bf16(w0) (from w0's exponent bits).

    ULP_bf16(w) = 2^(floor(log2 |w|) − 7) for a normal w; zeros and subnormals take the subnormal
    spacing 2^-133, i.e. the biased exponent 1.
    """
    _, delta_exp = torch.frexp(abs_delta)  # |Δ| = m·2^e, m in [0.5, 1): floor(log2 |Δ|) = e − 1
    spacing_exp = torch.clamp(float_exponent(base), min=1)  # log2 ULP_bf16(w0) = spacing_exp − 127 − 7
    return delta_exp.to(torch.int32) - 1 - (spacing_exp - 127 - BF16_MANTISSA_BITS)


def bf16_visible(base: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """bf16(θ1) ≠ bf16(θ0), both rounded to nearest even (torch's cast)."""
    return base.to(torch.bfloat16) != run.to(torch.bfloat16)


def _bincount(x: torch.Tensor, minlength: int) -> np.ndarray:
    if x.is_cuda:
        return torch.bincount(x.reshape(-1).long(), minlength=minlength).cpu().numpy()
    return np.bincount(x.reshape(-1).numpy(), minlength=minlength)


@dataclass(frozen=True)
class PrecisionFigures:
    """One run's precision figures on one tensor. visible/hidden are None unless the pair is finer than bf16."""

    ulp_histogram: tuple[int, ...]  # true updates per bin of floor(log2(|Δ| / ULP_bf16(w0))) (criteria.ULP_*)
    visible: int | None  # positions with bf16(θ1) ≠ bf16(θ0)
    hidden: int | None  # true updates with bf16(θ1) = bf16(θ0)


class PrecisionAccumulator:
    """Counts for one run and tensor, one chunk at a time: add() each chunk, finish() once."""

    def __init__(self, dtype: torch.dtype):
        self.applies = applies(dtype)
        self.above = above_bf16(dtype)
        self.histogram = np.zeros(ULP_BINS, dtype=np.int64)
        self.visible = 0
        self.hidden = 0

    def add(self, base: torch.Tensor, run: torch.Tensor, abs_delta: torch.Tensor, updated: torch.Tensor) -> None:
        """One chunk: base and run in the pair's dtype, |Δ| (NaN/Inf zeroed) and the true-update mask."""
        if not self.applies:
            return
        finite_updates = updated & (abs_delta > 0)  # a NaN/Inf Δ was zeroed: it has no distance to show
        x = ulp_log2(abs_delta[finite_updates], base[finite_updates])
        self.histogram += _bincount(torch.clamp(x, ULP_LOG2_MIN, ULP_LOG2_MAX) - ULP_LOG2_MIN, ULP_BINS)
        if self.above:
            visible = bf16_visible(base, run)
            self.visible += int(torch.count_nonzero(visible))
            self.hidden += int(torch.count_nonzero(updated & ~visible))

    def finish(self) -> PrecisionFigures | None:
        if not self.applies:
            return None
        return PrecisionFigures(tuple(int(c) for c in self.histogram),
                                self.visible if self.above else None, self.hidden if self.above else None)

