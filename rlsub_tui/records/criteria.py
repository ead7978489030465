"""What counts as updated, and the per-run numbers kept for each tensor (no torch: the UI imports this)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rlsub_tui.records.spectrum import RankFigures
from rlsub_tui.util.errors import InputError

CRITERIA = ("atol", "exact", "relative")
COMPARE_DTYPES = ("stored", "bf16", "fp16", "fp32")  # stored: each pair in the less precise of its two dtypes
# |w0| magnitude bins for "which weights changed": bin 0 holds zeros (and subnormals), bin b >= 1 holds
# |w0| in [2^x, 2^(x+1)) with x = MAG_X_MIN + b - 1, clamped to [MAG_X_MIN, MAG_X_MAX] at both ends.
MAG_X_MIN = -25
MAG_X_MAX = 3
# up to this many runs each tensor record keeps its 2^K run-code counts (subsets of runs without the masks);
# beyond, the record would grow too large (2^K integers per tensor)
MAX_SUBSET_RUNS = 10
MAG_BINS = MAG_X_MAX - MAG_X_MIN + 2
# Distance to bf16 visibility (precision.py): histogram of x = floor(log2(|Δ| / ULP_bf16(w0))) over a run's true
# updates, one bin per integer x in [ULP_LOG2_MIN, ULP_LOG2_MAX], the end bins open. fp32 cannot store a nonzero
# |Δ| below 2^-17 ULP_bf16(w0) (its ULP is 2^-16 of bf16's, halved below a power of two), so the first bin is
# exact for fp32 pairs; the last holds updates many ULPs wide (w0 near 0). r = |Δ|/(ULP/2) is in [2^(x+1), 2^(x+2)).
ULP_LOG2_MIN = -17
ULP_LOG2_MAX = 12
ULP_BINS = ULP_LOG2_MAX - ULP_LOG2_MIN + 1
# The tolerance sweep on by default: Mukherjee et al. Table 6's columns (see BENCHMARKS.md for its cost).
PAPER_SWEEP = (1e-8, 1e-7, 1e-6, 1e-5)
DEFAULT_SWEEP: tuple[float, ...] = PAPER_SWEEP


def parse_tolerance(text: str, what: str = "") -> float:
    """A tolerance, η or sweep value as typed (CLI or dialog): a finite number >= 0, else ValueError saying why."""
    name = f"{what} " if what else ""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{name}'{text.strip()}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}'{text.strip()}' must be a finite number >= 0")
    return value


def parse_sweep(text: str) -> tuple[float, ...]:
    """Sweep tolerances separated by commas, in increasing order; empty, 'none' or 'off': no sweep."""
    if text.strip().lower() in ("", "none", "off"):
        return ()
    return tuple(sorted(parse_tolerance(part, "sweep value") for part in text.split(",") if part.strip()))


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
    dtype: str = ""  # the dtype this run was compared with the base in
    # from the singular values of the same decomposition as `rank` (spectrum.py); None where rank is
    stable_rank: float | None = None
    energy_rank_90: int | None = None
    energy_rank_99: int | None = None
    effective_rank: float | None = None
    energy_curve: list[float] | None = None  # cumulative energy at k/min(m,n) = 0, 0.01, ..., 1 (spectrum.py)
    # precision.py: true updates (in the stored precision), bf16-visible updates and true updates hidden by
    # bf16, None unless the run is stored or compared finer than bf16; the histogram of
    # floor(log2(|Δ| / ULP_bf16(w0))) of the compared Δ, empty for fp8 pairs
    true_updated: int | None = None
    true_dtype: str | None = None  # the precision true updates were counted in (the stored one)
    updated_bf16_visible: int | None = None
    hidden_by_bf16: int | None = None
    ulp_histogram: list[int] = field(default_factory=list)
    # structure.py: rows and columns of a 2-D matrix holding an update; None otherwise
    rows_updated: int | None = None
    cols_updated: int | None = None

    def set_rank(self, figures) -> None:
        """Take rank and spectrum figures from a spectrum.RankFigures (None leaves all of them None)."""
        for name in SPECTRUM_FIELDS:
            setattr(self, name, getattr(figures, name) if figures is not None else None)
        if figures is not None:
            self.energy_curve = list(figures.energy_curve)

    def rank_figures(self) -> RankFigures | None:
        """The rank and spectrum figures as one record (for the cache); None when no rank was computed."""
        if self.rank is None:
            return None
        return RankFigures(*(getattr(self, name) for name in SPECTRUM_FIELDS), tuple(self.energy_curve or ()))


SPECTRUM_FIELDS = ("rank", "stable_rank", "energy_rank_90", "energy_rank_99", "effective_rank")


@dataclass
class AnalysisOptions:
    criterion: Criterion = field(default_factory=Criterion)
    sweep: tuple[float, ...] = ()
    rank: bool = True
    device: str = "auto"
    common_rows: bool = False
    use_cache: bool = True
    cache_dir: Path | None = None
    compare_dtype: str = "stored"
    workers: int = 1  # processes computing tensors side by side on the CPU (workers.py); changes no number
    subspaces: bool = True  # subspace overlaps of the runs' top singular directions (off without the rank)

    def __post_init__(self):
        if self.compare_dtype not in COMPARE_DTYPES:
            raise InputError(f"unknown --compare-dtype '{self.compare_dtype}'; choose one of {', '.join(COMPARE_DTYPES)}.")
        for t in self.sweep:
            if not math.isfinite(t) or t < 0:
                raise InputError(f"sweep tolerance {t} must be a finite number >= 0.")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers}: must be 1 or more.")
