"""One tensor's counts across K runs, built chunk by chunk: `add_chunk` for each slice, `finish` once."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rlsub_tui.compute.kernels import (
    GRAM_MIN_RUNS,
    MAX_CODED_RUNS,
    bincount,
    criterion_mask,
    magnitude_bins,
    magnitude_table,
    nonzero,
    pair_intersections,
    rounded,
    stored_delta,
    sum_sq,
)
from rlsub_tui.compute.precision import (
    BASE_CODE,
    DELTA_CODE,
    DISTANCE_KEYS,
    PrecisionAccumulator,
    SharedBase,
    base_key_term,
    distance_bins,
)
from rlsub_tui.compute.structure import CodeLines, LineAccumulator
from rlsub_tui.records.criteria import MAG_BINS, MAX_SUBSET_RUNS, Criterion
from rlsub_tui.util import device_route

STATE_CODED_RUNS = 6  # up to this many runs one histogram of (|w0| bin, K states) gives every cross-run count
PATTERN_DTYPES = (torch.bfloat16, torch.float16)  # 2^16 bit patterns: one histogram holds a run's Δ exactly
PATTERNS = 1 << 16
PATTERN_MIN_NUMEL = PATTERNS  # below this a histogram of 2^16 patterns costs more than it saves
NONFINITE, POSITIVE, NEGATIVE = 3, 1, 2
# The distance to visibility is counted from keys (precision.DELTA_CODE, BASE_CODE). With the state-code layout
# and a bf16 base, each run's state word carries its Δ part and the base's |w0| bin word the base part, both
# above EXPONENT_SHIFT: (state + bin word) >> EXPONENT_SHIFT is the key. The words are int32 (numpy's int32
# passes cost a quarter of int64's here): below the shift the layout's key (|w0| bin, K states), above it the
# sum of the base part and up to STATE_CODED_RUNS Δ parts, which must not overflow.
EXPONENT_SHIFT = 18
LOW_BITS = (1 << EXPONENT_SHIFT) - 1
assert MAG_BINS << 2 * STATE_CODED_RUNS <= 1 << EXPONENT_SHIFT
assert (BASE_CODE + STATE_CODED_RUNS * (DELTA_CODE + 254)) << EXPONENT_SHIFT < 1 << 31
# A chunk in which fewer than this fraction of positions changed in any run (RL updates: a few to 40%) is counted
# on those positions alone (`Chunk.positions`). Every other position has Δ = 0 in every run: its zero pattern
# counts for nothing in a run's figures, Σw0² and the |w0| bins come from the whole slice's base histogram, and its
# code 0 in the cross-run key is added from those bins (`with_left_out`). Measured: BENCHMARKS.md.
CHANGED_ONLY_BELOW = 0.75


def pattern_values(dtype: torch.dtype) -> torch.Tensor:
    """The value of every 16-bit pattern of `dtype`, as float32 (exact), indexed by the unsigned pattern."""
    return torch.arange(PATTERNS, dtype=torch.int32).to(torch.int16).view(dtype).float()


def patterns_of(x: torch.Tensor) -> np.ndarray:
    """Each 16-bit value's bit pattern in 0..65535, as an int32 numpy array (for _bincount and `looked_up`)."""
    return x.view(torch.int16).numpy().view(np.uint16).astype(np.int32)


def looked_up(table: np.ndarray, patterns: np.ndarray) -> torch.Tensor:
    """table[patterns] (int32 indices), by torch's index_select: np.take first widens int32 indices to int64."""
    return torch.index_select(torch.from_numpy(table), 0, torch.from_numpy(patterns))


@dataclass
class Chunk:
    """One slice of a tensor: the base as compared, its |w0| bins, and per run its stored Δ and states.

    On the changed-positions route (`positions` set) the base, bins, deltas, states and keys hold only the
    positions where some run's Δ is non-zero, `positions` their offsets in the slice (ascending) and `length`
    the slice's full length; runs stay whole (`run_slice` picks)."""

    base: torch.Tensor
    bins: torch.Tensor  # magnitude bin per position, shifted left by the cross-run layout's `bin_shift`
    states: list[torch.Tensor] = field(default_factory=list)  # per run, shifted left by its `state_shift`
    runs: list[torch.Tensor] = field(default_factory=list)  # each run's whole slice, in its pair's dtype
    base_sq: dict[torch.dtype, float] = field(default_factory=dict)  # Σw0² per comparison dtype
    start: int = 0  # the slice's first flat position in the tensor
    patterns: list = field(default_factory=list)  # per run: Δ's 16-bit patterns where a PatternRun counted it
    carried: bool = False  # the states and bins carry distance-key parts above EXPONENT_SHIFT
    key: torch.Tensor | None = None  # the cross-run layout's per-position code (StateCodes, RunCodes), once built
    deltas: list[torch.Tensor] | None = None  # per run: its stored Δ, when already computed (16-bit CPU chunks)
    base_counts: np.ndarray | None = None  # histogram of the whole slice's base bit patterns (16-bit CPU chunks)
    positions: np.ndarray | None = None
    length: int = 0
    _base_term: np.ndarray | None = None

    def base_term(self) -> np.ndarray:
        """BASE_CODE − max(e_w0, 1) per position, e_w0 the biased exponent of the base as bf16 holds it."""
        if self._base_term is None:
            self._base_term = base_key_term(self.base_in(torch.bfloat16))
        return self._base_term

    def base_in(self, dtype: torch.dtype) -> torch.Tensor:
        return self.base if self.base.dtype == dtype else self.base.to(dtype)

    def spread(self, values: np.ndarray) -> np.ndarray:
        """Values at the chunk's positions laid out over the whole slice, zero at the positions left out."""
        out = np.zeros(self.length, dtype=values.dtype)
        out[self.positions] = values
        return out

    def bin_counts(self) -> np.ndarray:
        """How many of the whole slice's positions fall in each |w0| magnitude bin (from `base_counts`)."""
        if self.base.dtype == torch.bfloat16:  # a bf16 value's bin is its exponent's: bits 7..14 of its pattern
            by_exponent = self.base_counts.reshape(2, 256, 128).sum(axis=(0, 2))
            return np.bincount(exponent_bins(), weights=by_exponent, minlength=MAG_BINS).astype(np.int64)
        weighted = np.bincount(plain_bins(self.base.dtype), weights=self.base_counts, minlength=MAG_BINS)
        return weighted.astype(np.int64)  # counts below 2^53: exact in float64

    def run_slice(self, j: int) -> torch.Tensor:
        """Run j at the chunk's positions."""
        run = self.runs[j]
        return run if self.positions is None else gathered(run, self.positions)

    def delta(self, j: int, dtype: torch.dtype) -> torch.Tensor:
        """Run j's stored Δ at the chunk's positions, compared in `dtype`."""
        if self.deltas is not None:
            return self.deltas[j]
        return stored_delta(self.base_in(dtype), self.run_slice(j))

    def sum_sq_base(self, dtype: torch.dtype, work: torch.dtype) -> float:
        """Σw0² over the whole slice: from its bit-pattern histogram (float64) where there is one for `dtype`."""
        if dtype not in self.base_sq:
            if self.base_counts is not None and dtype == self.base.dtype:
                self.base_sq[dtype] = sum_sq_of_patterns(self.base_counts, dtype)
            else:
                self.base_sq[dtype] = sum_sq(self.base_in(dtype).to(work))
        return self.base_sq[dtype]

    def sum_sq_base_where(self, dtype: torch.dtype, keep: torch.Tensor) -> float:
        """Σw0² over the slice, leaving out the chunk's positions where `keep` is False."""
        bj = self.base_in(dtype)
        if self.base_counts is None or dtype != self.base.dtype:  # then no position was left out of the chunk
            return sum_sq(torch.where(keep, bj.float(), 0.0))
        # the dropped positions' patterns taken out of the slice's histogram: each term exact, no cancellation
        # (subtracting their w0² from the whole sum lost every small weight beside a large dropped one)
        return sum_sq_of_patterns(self.base_counts - bincount(patterns_of(bj[~keep]), PATTERNS), dtype)


def gathered(x: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """x (flat, CPU) at `positions`; a 16-bit tensor through numpy on its bit patterns (faster than torch)."""
    if x.element_size() == 2:
        return torch.from_numpy(np.take(x.view(torch.int16).numpy(), positions)).view(x.dtype)
    return x[torch.from_numpy(positions)]


def sum_sq_of_patterns(counts: np.ndarray, dtype: torch.dtype) -> float:
    """Σ value² over a histogram of 16-bit patterns of `dtype`, in float64 (NaN/Inf count 0); a plain product
    and sum: `@` would wake BLAS's threads."""
    return float((counts * pattern_squares(dtype)).sum())


@functools.lru_cache(maxsize=4)
def pattern_squares(dtype: torch.dtype) -> np.ndarray:
    """value² of every 16-bit pattern of `dtype` as float64 (exact), 0 for NaN/Inf: Σw0² = counts · this."""
    values = pattern_values(dtype).double()
    return torch.where(torch.isfinite(values), values * values, 0.0).numpy()


@dataclass
class RunTotals:
    """One run's sums over the chunks seen so far (the fields of RunTensorStats that add up)."""

    updated: int = 0
    nonfinite: int = 0
    sum_abs_delta: float = 0.0
    sq_delta: float = 0.0
    sq_base: float = 0.0
    sweep: list[int] = field(default_factory=list)


class FloatRun:
    """Any dtype, criterion and device: Δ in float32/64 with NaN/Inf zeroed and counted."""

    def __init__(self, dtype: torch.dtype, criterion: Criterion, sweep: tuple[float, ...], shift: int):
        self.dtype, self.criterion, self.shift = dtype, criterion, shift
        self.work = torch.float64 if dtype == torch.float64 else torch.float32
        self.tol = rounded(criterion.value, dtype) if criterion.name == "atol" else 0.0
        self.sweep_tols = [rounded(t, dtype) for t in sweep]
        self.totals = RunTotals(sweep=[0] * len(sweep))

    def add(self, chunk: Chunk, j: int) -> torch.Tensor:
        """Count run j's chunk; return its states (shifted)."""
        bj, t, run = chunk.base_in(self.dtype), self.totals, chunk.run_slice(j)
        d = chunk.delta(j, self.dtype).to(self.work)
        absd = d.abs()
        total = float(absd.sum())
        finite = None
        if math.isfinite(total):
            t.sq_base += chunk.sum_sq_base(self.dtype, self.work)
        else:  # NaN/Inf in Δ (rare): zero it out, count as updated
            finite = torch.isfinite(d)
            d = torch.where(finite, d, torch.zeros_like(d))
            absd = d.abs()
            total = float(absd.sum())
            t.sq_base += sum_sq(torch.where(finite, bj.to(self.work), torch.zeros_like(d)))
        mask = criterion_mask(bj, run, absd, self.criterion, self.tol, self.work)
        bad = 0
        if finite is not None:
            bad = d.numel() - nonzero(finite)
            mask |= ~finite
            t.nonfinite += bad
        t.updated += nonzero(mask)
        for i, tol in enumerate(self.sweep_tols):
            t.sweep[i] += nonzero(absd > tol) + bad
        t.sum_abs_delta += total
        t.sq_delta += float(torch.dot(d, d))
        kind = torch.int32 if self.shift else torch.uint8  # unshifted (K > 6): a byte each, K of them kept
        state = mask.to(kind) + (mask & (d < 0)).to(kind)
        if finite is not None:
            state = torch.where(finite, state, NONFINITE)
        return state << self.shift if self.shift else state

    def finish(self) -> RunTotals:
        return self.totals


@dataclass(frozen=True)
class PatternTable:
    """What every 16-bit pattern of Δ means for one dtype and threshold: its value and its state."""

    abs_values: np.ndarray  # |value| as float64, 0 for NaN/Inf
    finite: np.ndarray
    nonfinite_patterns: np.ndarray
    states: np.ndarray  # int32, shifted; with the exponent code above EXPONENT_SHIFT if carried
    carries_exponent: bool = False


@functools.lru_cache(maxsize=64)
def pattern_table(dtype: torch.dtype, tol: float, shift: int, carry_exponent: bool = False) -> PatternTable:
    """`carry_exponent` (bf16 only): each state word also holds counted_exponent_code << EXPONENT_SHIFT, so the
    one lookup that gives a run's states also gives its part of the distance key (PrecisionAndLines)."""
    values = pattern_values(dtype)
    finite = torch.isfinite(values)
    updated = values.abs() > tol
    state = updated.to(torch.int64) + (updated & (values < 0)).to(torch.int64)
    states = (torch.where(finite, state, NONFINITE) << shift).numpy()
    abs_values = torch.where(finite, values.abs(), 0.0).double()
    if carry_exponent:
        states = states | (counted_exponent_code(states >> shift & 3) << EXPONENT_SHIFT)
    return PatternTable(abs_values.numpy(), finite.numpy(), np.flatnonzero(~finite.numpy()), states.astype(np.int32),
                        carry_exponent)


class PatternRun:
    """A 16-bit comparison dtype under atol or exact, on the CPU: one histogram of Δ's bit patterns per run.

    |Δ| > t for a float t is a property of Δ's pattern, so the updated count, every sweep count, the
    NaN/Inf count and Σ|Δ|, ΣΔ² (in float64) all follow from the histogram at the end, and the
    per-position state is one table lookup. A zero Δ counts for nothing in any of them, so positions that a
    chunk leaves out (Δ = 0) need no count here. Exact equals atol 0 here: two stored values differ
    exactly when their difference, rounded to the dtype, is non-zero (gradual underflow).
    """

    def __init__(self, dtype: torch.dtype, criterion: Criterion, sweep: tuple[float, ...], shift: int,
                 carry_exponent: bool = False):
        self.dtype = dtype
        tol = rounded(criterion.value, dtype) if criterion.name == "atol" else 0.0
        self.table = pattern_table(dtype, tol, shift, carry_exponent)
        self.sweep_tols = [rounded(t, dtype) for t in sweep]
        self.hist = np.zeros(PATTERNS, dtype=np.int64)
        self.sq_base = 0.0
        self.last_pattern: np.ndarray | None = None

    def add(self, chunk: Chunk, j: int) -> torch.Tensor:
        pattern = patterns_of(chunk.delta(j, self.dtype))
        self.last_pattern = pattern  # for the distance-to-visibility histogram (PrecisionAndLines)
        counts = bincount(pattern, PATTERNS)
        self.hist += counts
        if counts[self.table.nonfinite_patterns].any():  # leave the NaN/Inf positions out of Σw0²
            self.sq_base += chunk.sum_sq_base_where(self.dtype, torch.from_numpy(self.table.finite[pattern]))
        else:
            self.sq_base += chunk.sum_sq_base(self.dtype, torch.float32)
        return looked_up(self.table.states, pattern)

    def finish(self) -> RunTotals:
        h, absv = self.hist, self.table.abs_values
        weights = h.astype(np.float64)  # exact below 2^53; plain sums: a BLAS dot wakes its threads, int64 @ float64 crawls
        nonfinite = int(h[~self.table.finite].sum())
        return RunTotals(
            updated=int(h[(self.table.states & LOW_BITS) != 0].sum()), nonfinite=nonfinite,
            sum_abs_delta=float((weights * absv).sum()), sq_delta=float((weights * absv * absv).sum()), sq_base=self.sq_base,
            sweep=[int(h[absv > t].sum()) + nonfinite for t in self.sweep_tols])


def run_accumulator(dtype: torch.dtype, criterion: Criterion, sweep: tuple[float, ...], device: torch.device,
                    shift: int, numel: int, carry_exponent: bool = False):
    """The fastest exact accumulator for one run's pair dtype and criterion on this device; `carry_exponent`:
    a bf16 PatternRun's states also carry the distance-to-visibility key (the layout must mask it off)."""
    if (not device_route.cuda_route(device.type) and dtype in PATTERN_DTYPES and criterion.name in ("atol", "exact")
            and numel >= PATTERN_MIN_NUMEL):
        return PatternRun(dtype, criterion, sweep, shift, carry_exponent and dtype == torch.bfloat16)
    return FloatRun(dtype, criterion, sweep, shift)


@dataclass
class CrossRun:
    """What the cross-run accumulators fill in at `finish`."""

    k: int
    magnitude_numel: np.ndarray | None = None
    magnitude_updated: list[np.ndarray] | None = None
    both: dict[tuple[int, int], int] | None = None
    agreement: np.ndarray | None = None
    multi: int = 0
    sign_agree: int = 0
    run_codes: list[int] = field(default_factory=list)
    precision: list = field(default_factory=list)  # per run: precision.PrecisionFigures or None
    lines: list = field(default_factory=list)  # per run: structure.LineCounts or None


def _from_run_codes(out: CrossRun, table: np.ndarray) -> None:
    """Magnitude profile, pair overlaps, agreement and subset counts from a (bin, run code) histogram."""
    k = out.k
    out.magnitude_numel = table.sum(axis=1)
    by_code = table.sum(axis=0)
    codes = np.arange(1 << k)
    bits = [(codes >> j) & 1 == 1 for j in range(k)]
    out.magnitude_updated = [table[:, bits[j]].sum(axis=1) for j in range(k)]
    out.both = {(a, c): int(by_code[bits[a] & bits[c]].sum()) for a in range(k) for c in range(a + 1, k)}
    popcount = np.array([bin(c).count("1") for c in codes])
    out.agreement = np.bincount(popcount, weights=by_code, minlength=k + 1).astype(np.int64)
    out.run_codes = [int(x) for x in by_code] if k <= MAX_SUBSET_RUNS else []


def with_left_out(counts: np.ndarray, chunk: Chunk) -> np.ndarray:
    """A chunk's (|w0| bin, code) histogram with the positions left out of it added (code 0: no run changed)."""
    if chunk.positions is not None:
        table = counts.reshape(MAG_BINS, -1)
        table[:, 0] += chunk.bin_counts() - table.sum(axis=1)
    return counts


class StateCodes:
    """Up to STATE_CODED_RUNS runs: one histogram of (|w0| bin, the K states) per chunk gives everything."""

    carries_exponents = True  # its key masks off what runs carry above EXPONENT_SHIFT

    def __init__(self, k: int):
        self.k = k
        self.joint = np.zeros(MAG_BINS << 2 * k, dtype=np.int64)

    bin_shift = property(lambda self: 2 * self.k)

    def state_shift(self, j: int) -> int:
        return 2 * j

    def run_field(self, j: int) -> tuple[int, int]:
        """Where run j sits in the key: (key >> shift) & field is non-zero where it updated."""
        return 2 * j, 3

    def add(self, chunk: Chunk) -> None:
        if device_route.cuda_route(chunk.bins.device.type):
            key = chunk.bins + chunk.states[0]
            for s in chunk.states[1:]:
                key += s
        else:  # numpy: its int32 adds run several times faster than torch's on one thread
            key = np.add(chunk.bins.numpy(), chunk.states[0].numpy(), dtype=np.int32)
            for s in chunk.states[1:]:
                key += s.numpy()
            key = torch.from_numpy(key)
        if chunk.carried:
            key &= LOW_BITS
        chunk.key = None if device_route.cuda_route(key.device.type) else key  # for CodeLines (CPU route only)
        self.joint += with_left_out(bincount(key, len(self.joint)), chunk)

    def finish(self, out: CrossRun) -> None:
        k = self.k
        table = self.joint.reshape(MAG_BINS, 1 << 2 * k)
        run_code, several, agree = state_code_meaning(k)
        by_run_code = np.zeros((MAG_BINS, 1 << k), dtype=np.int64)
        np.add.at(by_run_code.T, run_code, table.T)
        _from_run_codes(out, by_run_code)
        by_state = table.sum(axis=0)
        out.multi = int(by_state[several].sum())
        out.sign_agree = int(by_state[agree].sum())


@functools.lru_cache(maxsize=STATE_CODED_RUNS)
def state_code_meaning(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per code of K states: its run code, whether two or more runs updated it with no NaN/Inf among them
    (counted in `multi`), and whether those runs' signs also agree."""
    codes = np.arange(1 << 2 * k)
    states = [(codes >> 2 * j) & 3 for j in range(k)]
    run_code = sum((s != 0).astype(np.int64) << j for j, s in enumerate(states))
    updated = sum((s != 0).astype(np.int64) for s in states)
    several = (updated >= 2) & np.all([s != NONFINITE for s in states], axis=0)
    same = np.all([s != NEGATIVE for s in states], axis=0) | np.all([s != POSITIVE for s in states], axis=0)
    return run_code, several, several & same


class RunCodes:
    """Up to MAX_CODED_RUNS runs: one histogram of (|w0| bin, run code: bit j set when run j updated)."""

    def __init__(self, k: int):
        self.k = k
        self.joint = np.zeros(MAG_BINS << k, dtype=np.int64)

    bin_shift = property(lambda self: self.k)
    carries_exponents = False

    def state_shift(self, j: int) -> int:
        return 0

    def run_field(self, j: int) -> tuple[int, int]:
        return j, 1

    def add(self, chunk: Chunk) -> None:
        key = chunk.bins.clone()
        for j, s in enumerate(chunk.states):
            key |= (s != 0).to(torch.int32) << j
        chunk.key = None if device_route.cuda_route(key.device.type) else key
        self.joint += with_left_out(bincount(key, len(self.joint)), chunk)

    def finish(self, out: CrossRun) -> None:
        _from_run_codes(out, self.joint.reshape(MAG_BINS, 1 << self.k))


class Pairwise:
    """Beyond MAX_CODED_RUNS: per-run magnitude histograms, the agreement count, pair overlaps from the masks."""

    bin_shift = 0
    carries_exponents = False

    def __init__(self, k: int):
        self.k = k
        self.magnitude_numel = np.zeros(MAG_BINS, dtype=np.int64)
        self.magnitude_updated = [np.zeros(MAG_BINS, dtype=np.int64) for _ in range(k)]
        self.both = {(a, c): 0 for a in range(k) for c in range(a + 1, k)}
        self.agreement = np.zeros(k + 1, dtype=np.int64)

    def state_shift(self, j: int) -> int:
        return 0

    def add(self, chunk: Chunk) -> None:
        masks = [s != 0 for s in chunk.states]
        count = torch.zeros(chunk.bins.shape, dtype=torch.int16, device=chunk.bins.device)
        for j, mask in enumerate(masks):
            count += mask
            self.magnitude_updated[j] += bincount(chunk.bins[mask], MAG_BINS)
        self.magnitude_numel += bincount(chunk.bins, MAG_BINS)
        self.agreement += bincount(count, self.k + 1)
        if self.k >= GRAM_MIN_RUNS:
            inter = pair_intersections(masks)
            for (a, c) in self.both:
                self.both[(a, c)] += int(inter[a, c])
        else:
            for (a, c) in self.both:
                self.both[(a, c)] += nonzero(masks[a] & masks[c])

    def finish(self, out: CrossRun) -> None:
        out.magnitude_numel, out.magnitude_updated = self.magnitude_numel, self.magnitude_updated
        out.both, out.agreement = self.both, self.agreement


class SignTally:
    """Beyond STATE_CODED_RUNS: positions updated by two or more runs, and those where their signs agree."""

    def __init__(self):
        self.multi = self.sign_agree = 0

    def add(self, chunk: Chunk) -> None:
        shape, dev = chunk.bins.shape, chunk.bins.device
        count = torch.zeros(shape, dtype=torch.int16, device=dev)  # int8 would overflow past 127 runs
        signs = torch.zeros(shape, dtype=torch.int16, device=dev)
        unsigned = torch.zeros(shape, dtype=torch.bool, device=dev)
        for s in chunk.states:
            count += s != 0
            signs += (s == POSITIVE).to(torch.int16) - (s == NEGATIVE).to(torch.int16)
            unsigned |= s == NONFINITE
        several = (count >= 2) & ~unsigned
        self.multi += nonzero(several)
        self.sign_agree += nonzero(several & (signs.abs() == count))

    def finish(self, out: CrossRun) -> None:
        out.multi, out.sign_agree = self.multi, self.sign_agree


class PrecisionAndLines:
    """Issue 11 items 1 and 4, per run: the bf16 visibility and distance to visibility of its true updates
    (precision.py), and the rows and columns of a 2-D tensor holding one (structure.py).

    On the CPU with a coded layout (K <= MAX_CODED_RUNS) the rows and columns of every run come from one OR
    of the layout's key (structure.CodeLines); a bf16 pair on the pattern path takes its distance histogram
    from its states (the exponent code they carry) or its Δ patterns. Otherwise it reads each run's updated
    positions from its states and recomputes |Δ| only where the precision figures apply."""

    def __init__(self, dtypes: list[torch.dtype], shape: tuple[int, ...], device: torch.device, layout,
                 state_tables: list | None = None):
        shared = SharedBase()  # the runs compared in bf16 share the base's exponent work
        self.dtypes, self.layout = dtypes, layout
        self.shifts = [layout.state_shift(j) for j in range(len(dtypes))]
        self.precision = [PrecisionAccumulator(dt, shared) for dt in dtypes]
        by_code = len(shape) == 2 and not device_route.cuda_route(device.type) and hasattr(layout, "run_field")
        self.code_lines = CodeLines(shape) if by_code else None
        self.lines = [LineAccumulator(() if by_code else shape, device) for _ in dtypes]
        self.joint: list[np.ndarray | None] = [None] * len(dtypes)  # bf16 pairs on the pattern path
        self.state_tables = state_tables or [None] * len(dtypes)  # each run's PatternTable (PatternRun only)
        self.codes: list[np.ndarray | None] = [None] * len(dtypes)
        self.key_buffer: np.ndarray | None = None

    def add(self, chunk: Chunk) -> None:
        if self.code_lines is not None:
            key = chunk.key.numpy().reshape(-1)
            if chunk.positions is not None:  # the run fields only (the low bits), every left-out position 0
                key = chunk.spread((key & ((1 << self.layout.bin_shift) - 1)).astype(np.int16))
            self.code_lines.add(key, chunk.start)
        for j, state in enumerate(chunk.states):
            shift, precision = self.shifts[j], self.precision[j]
            pattern = chunk.patterns[j] if chunk.patterns else None
            by_pattern = pattern is not None and self.dtypes[j] == torch.bfloat16 and precision.applies
            if by_pattern:
                self._add_bf16_patterns(j, chunk, pattern)
            precision_left = precision.applies and not by_pattern
            if not self.lines[j].applies and not precision_left:
                continue  # nothing else to count: the updated mask is not needed
            updated, finite = _updated_and_finite(state, shift)
            if self.lines[j].applies:
                spread = updated if chunk.positions is None else torch.from_numpy(chunk.spread(updated.numpy()))
                self.lines[j].add(spread, chunk.start)
            if not precision_left:
                continue
            bj, run = chunk.base_in(self.dtypes[j]), chunk.run_slice(j)
            delta = chunk.delta(j, self.dtypes[j])
            absd = (delta if delta.dtype == torch.float64 else delta.float()).abs()
            if finite is not None:
                absd = torch.where(finite, absd, torch.zeros_like(absd))
            precision.add(bj, run, absd, updated, finite)

    def _add_bf16_patterns(self, j: int, chunk: Chunk, pattern: np.ndarray) -> None:
        """A bf16 pair counted by a PatternRun: the histogram of its distance keys (precision.DELTA_CODE), which
        finish() turns into the distance bins as precision.ulp_bins does per value. The Δ part of each key is
        what the run's states carry (with the base part in the bin words), else one lookup by Δ's pattern."""
        table = self.state_tables[j]
        if self.joint[j] is None:
            self.joint[j] = np.zeros(DISTANCE_KEYS, dtype=np.int64)
            if not table.carries_exponent:
                self.codes[j] = counted_exponent_code((table.states >> self.shifts[j]) & 3).astype(np.int32)
        if table.carries_exponent:  # the bins carry the base part (TensorAccumulator sees to it)
            n = chunk.base.numel()
            if self.key_buffer is None or self.key_buffer.size < n:
                self.key_buffer = np.empty(n, dtype=np.int32)  # kept: a fresh one per chunk costs its page faults
            key = np.add(chunk.states[j].numpy(), chunk.bins.numpy(), out=self.key_buffer[:n])
            key >>= EXPONENT_SHIFT
        else:
            key = looked_up(self.codes[j], pattern).numpy()
            key += chunk.base_term()
        self.joint[j] += bincount(key, DISTANCE_KEYS)

    def finish(self, out: CrossRun) -> None:
        for p, joint in zip(self.precision, self.joint):
            if joint is not None:
                p.histogram += distance_bins(joint)
        out.precision = [p.finish() for p in self.precision]
        if self.code_lines is not None:
            out.lines = [self.code_lines.finish(*self.layout.run_field(j)) for j in range(len(self.dtypes))]
        else:
            out.lines = [line.finish() for line in self.lines]


def _updated_and_finite(state: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A run's updated mask from its (shifted) states, and where its Δ is finite (None when it is everywhere);
    in numpy on the CPU, where torch's comparisons of int64 run several times slower on one thread."""
    if device_route.cuda_route(state.device.type):
        field = state & (3 << shift) if shift else state
        finite = field != NONFINITE << shift
        return field != 0, (None if bool(finite.all()) else finite)
    field = state.numpy() & (3 << shift)  # a carried exponent code (pattern path) sits above the fields
    finite = field != NONFINITE << shift
    return torch.from_numpy(field != 0), (None if finite.all() else torch.from_numpy(finite))


def counted_exponent_code(states: np.ndarray) -> np.ndarray:
    """Per bf16 pattern of Δ (its unshifted state given): DELTA_CODE + the biased exponent of |Δ| where Δ is a
    finite true update, else 0."""
    counted = (states == POSITIVE) | (states == NEGATIVE)
    exponent = (np.arange(PATTERNS, dtype=np.int64) & 0x7FFF) >> 7
    return np.where(counted, DELTA_CODE + exponent, 0)


def cross_run_accumulators(k: int) -> list:
    """The layout (first) and the other per-chunk cross-run accumulators for K runs."""
    if k <= STATE_CODED_RUNS:
        return [StateCodes(k)]
    return [RunCodes(k) if k <= MAX_CODED_RUNS else Pairwise(k), SignTally()]


class TensorAccumulator:
    """Every count of one tensor across K runs, from its chunks: `add_chunk(base, runs)` each, then `finish()`.

    `dtypes[j]` is the dtype run j is compared in (its slice already in it); the base slice is cast to it.
    Each run's chunk first becomes its stored Δ and a per-position *state*: 0 not updated, 1 updated with
    Δ > 0, 2 updated with Δ < 0, 3 updated with Δ NaN/Inf (no sign). Per-run accumulators (`PatternRun`,
    `FloatRun`) turn Δ into that run's numbers and its states; cross-run accumulators (`StateCodes`,
    `RunCodes`, `Pairwise`, `SignTally`) combine the K states. Adding a per-chunk measure = one class with
    `add(chunk)` and `finish(out)`, appended to `self.cross` (and a field of `CrossRun` for its result).
    """

    def __init__(self, base_dtype: torch.dtype, dtypes: list[torch.dtype], criterion: Criterion,
                 sweep: tuple[float, ...], device: torch.device, numel: int, shape: tuple[int, ...] | None = None):
        self.k = len(dtypes)
        self.cross = cross_run_accumulators(self.k)
        layout = self.cross[0]
        # bf16 runs of a bf16 base carry their distance key in their state words and bin words (see EXPONENT_SHIFT)
        carry = layout.carries_exponents and base_dtype == torch.bfloat16 and not device_route.cuda_route(device.type)
        self.per_run = [run_accumulator(dt, criterion, sweep, device, layout.state_shift(j), numel, carry)
                        for j, dt in enumerate(dtypes)]
        tables = [getattr(acc, "table", None) for acc in self.per_run]
        self.carried = any(t is not None and t.carries_exponent for t in tables)
        self.cross.append(PrecisionAndLines(dtypes, shape if shape is not None else (numel,), device, layout, tables))
        self.base_bins = BaseBins(base_dtype, layout.bin_shift, device, carry_base_term=self.carried)
        # 16-bit pairs on the pattern path, every run in the base's dtype, a coded layout: chunks may be counted
        # on their changed positions alone (Chunk.positions)
        self.may_skip_unchanged = (not device_route.cuda_route(device.type) and base_dtype in PATTERN_DTYPES
                                   and all(dt == base_dtype for dt in dtypes)
                                   and all(isinstance(acc, PatternRun) for acc in self.per_run)
                                   and isinstance(layout, (StateCodes, RunCodes)))
        self.offset = 0

    def add_chunk(self, base: torch.Tensor, runs: list[torch.Tensor]) -> None:
        start = self.offset
        self.offset += base.numel()
        if self.may_skip_unchanged:
            chunk = self._changed_positions(base, runs, start)
        else:
            chunk = Chunk(base, self.base_bins(base), runs=runs, start=start, carried=self.carried)
        chunk.states = [acc.add(chunk, j) for j, acc in enumerate(self.per_run)]
        chunk.patterns = [getattr(acc, "last_pattern", None) for acc in self.per_run]
        for acc in self.cross:
            acc.add(chunk)

    def _changed_positions(self, base: torch.Tensor, runs: list[torch.Tensor], start: int) -> Chunk:
        """A 16-bit chunk with each run's Δ computed once, reduced to the positions where some run's Δ is
        non-zero when fewer than CHANGED_ONLY_BELOW of them are (±0 is no change: its state is 0 and its
        pattern counts as 0's)."""
        counts = bincount(base.view(torch.int16).numpy().view(np.uint16), PATTERNS)
        deltas = [stored_delta(base, run) for run in runs]
        bits = deltas[0].view(torch.int16).numpy()
        for delta in deltas[1:]:  # OR of the Δ patterns: a non-zero magnitude bit where some run's Δ is non-zero
            bits = bits | delta.view(torch.int16).numpy()
        changed = (bits & 0x7FFF) != 0
        n = base.numel()
        if np.count_nonzero(changed) >= CHANGED_ONLY_BELOW * n:
            return Chunk(base, self.base_bins(base), runs=runs, start=start, carried=self.carried, deltas=deltas,
                         base_counts=counts)
        positions = np.flatnonzero(changed)
        kept = gathered(base, positions)
        return Chunk(kept, self.base_bins(kept), runs=runs, start=start, carried=self.carried,
                     deltas=[gathered(d, positions) for d in deltas], base_counts=counts, positions=positions,
                     length=n)

    def finish(self) -> tuple[list[RunTotals], CrossRun]:
        out = CrossRun(self.k)
        for acc in self.cross:
            acc.finish(out)
        return [acc.finish() for acc in self.per_run], out


class BaseBins:
    """The |w0| magnitude bin of every base position, shifted; one table lookup for a 16-bit base."""

    def __init__(self, dtype: torch.dtype, shift: int, device: torch.device, carry_base_term: bool = False):
        """`carry_base_term` (a bf16 base on the CPU): each bin word also holds BASE_CODE − max(e_w0, 1) above
        EXPONENT_SHIFT, the base's part of the distance key."""
        self.table = magnitude_table(shift, device)
        self.by_pattern = (_bins_by_pattern(dtype, shift, carry_base_term)
                           if not device_route.cuda_route(device.type) and dtype in PATTERN_DTYPES else None)

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        if self.by_pattern is not None:  # on the CPU only
            return looked_up(self.by_pattern, patterns_of(base))
        return magnitude_bins(base.to(torch.float32), self.table)


@functools.lru_cache(maxsize=4)
def plain_bins(dtype: torch.dtype) -> np.ndarray:
    """The |w0| magnitude bin (unshifted) of every 16-bit pattern of `dtype`."""
    return magnitude_bins(pattern_values(dtype), magnitude_table(0)).long().numpy()


@functools.lru_cache(maxsize=1)
def exponent_bins() -> np.ndarray:
    """The |w0| magnitude bin of each biased float32 (and bf16) exponent 0..255."""
    return magnitude_table(0).long().numpy()


@functools.lru_cache(maxsize=16)
def _bins_by_pattern(dtype: torch.dtype, shift: int, carry_base_term: bool = False) -> np.ndarray:
    bins = magnitude_bins(pattern_values(dtype), magnitude_table(shift)).long().numpy()
    if carry_base_term:
        assert dtype == torch.bfloat16
        bins = bins | base_key_term(pattern_values(dtype)) << EXPONENT_SHIFT
    return bins.astype(np.int32)
