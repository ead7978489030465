"""Analysis results: one record per tensor, and pooled statistics over any set of tensors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from rlsub_tui.records import measures, overlap
from rlsub_tui.records.criteria import MAG_BINS, MAX_SUBSET_RUNS, ULP_BINS, Criterion, RunTensorStats
from rlsub_tui.records.measures import SPECTRUM_RATIOS  # re-exported: other modules read it from here
from rlsub_tui.records.subspaces import SubspaceRow, SubspaceTotals

# 5: per-pair dtypes, spectrum figures, run codes per record; 6: the cumulative-energy curve; 8: all of them;
# 9: bf16 visibility, the ULP histogram, rows and columns touched
RESULT_VERSION = 10


@dataclass
class TensorResult:
    """Everything measured on one tensor (named as the base stores it) across the K runs."""

    name: str
    dtype: str
    shape: list[int]
    numel: int
    runs: list[RunTensorStats]
    both: dict[tuple[int, int], int]
    agreement: list[int]
    multi: int
    sign_agree: int
    magnitude_numel: list[int]
    notes: list[str] = field(default_factory=list)
    # parameters per run code (bit j set: run j updated it), 2^K entries; empty beyond MAX_SUBSET_RUNS. Any subset of
    # runs' agreement histogram and consensus follow from it without the masks.
    run_codes: list[int] = field(default_factory=list)
    # subspace overlaps (records/subspaces.py): SubspaceRow.to_list() per pair, side and k; empty without them
    subspaces: list[list] = field(default_factory=list)

    @property
    def max_rank(self) -> int | None:
        """min(m, n) of a matrix; for a 3-D stack of E expert matrices E·min(m, n), so the ratio is their mean."""
        if len(self.shape) == 3:
            return self.shape[0] * min(self.shape[1:])
        return min(self.shape) if len(self.shape) == 2 else None

    def strata(self) -> tuple[np.ndarray, np.ndarray]:
        """Per |w0| magnitude bin of this tensor (its strata): updated counts (K, bins) and sizes (bins,)."""
        updated = np.array([s.magnitude_updated for s in self.runs], dtype=np.int64).reshape(len(self.runs), -1)
        return updated, np.asarray(self.magnitude_numel, dtype=np.int64)

    def chance_strat(self) -> tuple[np.ndarray, np.ndarray]:
        """This tensor's part of the stratified null: expected intersections E (K, K) and expected agreement
        counts (K + 1,). Computed once: a record does not change after it is made, and every node holding
        the tensor adds the same numbers."""
        cached = self.__dict__.get("_chance_strat")
        if cached is None:
            updated, numel = self.strata()
            cached = (overlap.expected_intersections(updated, numel), overlap.agreement_chance_strat(updated, numel))
            self.__dict__["_chance_strat"] = cached
        return cached

    def subspace_rows(self) -> list[SubspaceRow]:
        """This tensor's subspace overlaps as rows, parsed once (as `chance_strat`: every node adds the same)."""
        cached = self.__dict__.get("_subspace_rows")
        if cached is None:
            cached = [SubspaceRow.from_list(x) for x in self.subspaces]
            self.__dict__["_subspace_rows"] = cached
        return cached

    def to_dict(self) -> dict:
        d = asdict(self)
        d["both"] = [[a, b, n] for (a, b), n in self.both.items()]
        d["version"] = RESULT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorResult":
        """Rebuild from to_dict(); raises KeyError/TypeError/ValueError on a foreign or stale record."""
        if d.get("version") != RESULT_VERSION:
            raise ValueError("stale result record")
        runs = [RunTensorStats(**r) for r in d["runs"]]
        both = {(int(a), int(b)): int(n) for a, b, n in d["both"]}
        result = cls(str(d["name"]), str(d["dtype"]), [int(x) for x in d["shape"]], int(d["numel"]), runs,
                     both, [int(x) for x in d["agreement"]], int(d["multi"]), int(d["sign_agree"]),
                     [int(x) for x in d["magnitude_numel"]], [str(n) for n in d.get("notes", [])],
                     [int(x) for x in d.get("run_codes", [])],
                     [SubspaceRow.from_list(x).to_list() for x in d.get("subspaces", [])])
        k = len(runs)
        if len(result.agreement) != k + 1 or sum(result.agreement) != result.numel:
            raise ValueError("inconsistent result record")
        if len(result.magnitude_numel) != MAG_BINS or any(len(s.magnitude_updated) != MAG_BINS for s in runs):
            raise ValueError("inconsistent result record")  # the strata of the stratified null
        if result.run_codes and (len(result.run_codes) != 1 << k or sum(result.run_codes) != result.numel):
            raise ValueError("inconsistent result record")
        return result


@dataclass
class Skipped:
    """A tensor left out of the comparison, and why (never dropped silently)."""

    tensor: str
    run: str
    reason: str


class Stats:
    """Pooled (numel-weighted) statistics over a set of tensors, for K runs."""

    def __init__(self, k: int, sweep_len: int = 0):
        self.k = k
        self.tensors = 0
        self.numel = 0
        self.updated = np.zeros(k, dtype=np.int64)
        self.nonfinite = np.zeros(k, dtype=np.int64)
        self.sweep = np.zeros((k, sweep_len), dtype=np.int64)
        self.both = np.zeros((k, k), dtype=np.int64)
        self.agreement = np.zeros(k + 1, dtype=np.int64)
        self.multi = 0
        self.sign_agree = 0
        self.sum_abs = np.zeros(k)
        self.sq_delta = np.zeros(k)
        self.sq_base = np.zeros(k)
        self.magnitude_numel = np.zeros(MAG_BINS, dtype=np.int64)
        self.magnitude_updated = np.zeros((k, MAG_BINS), dtype=np.int64)
        self.rank_ratios: list[list[float]] = [[] for _ in range(k)]
        self.spectrum_ratios = {f: [[] for _ in range(k)] for f in SPECTRUM_RATIOS}
        self.expected_both = np.zeros((k, k))  # Σ over strata of a_s·b_s/n_s (the stratified null)
        self.agreement_expected_strat = np.zeros(k + 1)
        self.run_codes = np.zeros(1 << k if k <= MAX_SUBSET_RUNS else 0, dtype=np.int64)
        self.coded = k <= MAX_SUBSET_RUNS  # False once a tensor without run codes is added
        # precision: over tensors whose run is stored (or compared) finer than bf16, their parameters, true
        # updates in the stored precision, bf16-visible and hidden
        self.fine_numel = np.zeros(k, dtype=np.int64)
        self.fine_updated = np.zeros(k, dtype=np.int64)
        self.bf16_visible = np.zeros(k, dtype=np.int64)
        self.bf16_hidden = np.zeros(k, dtype=np.int64)
        self.fine_tensors = np.zeros(k, dtype=np.int64)
        self.compared_dtypes: list[set[str]] = [set() for _ in range(k)]  # per run: the dtypes it was compared in
        self.true_dtypes: list[set[str]] = [set() for _ in range(k)]  # per run: where true updates were counted
        self.ulp_histogram = np.zeros((k, ULP_BINS), dtype=np.int64)
        # rows and columns: over 2-D matrices, rows/columns in all, touched, and expected touched by chance
        self.lines = {axis: np.zeros((3, k)) for axis in ("rows", "cols")}
        self.subspaces = SubspaceTotals()  # subspace overlaps, k-weighted over the matrices (records/subspaces.py)

    def add(self, r: TensorResult) -> None:
        self.tensors += 1
        self.numel += r.numel
        for i, s in enumerate(r.runs):
            self.updated[i] += s.updated
            self.nonfinite[i] += s.nonfinite
            if s.sweep and len(s.sweep) == self.sweep.shape[1]:
                self.sweep[i] += np.asarray(s.sweep, dtype=np.int64)
            self.sum_abs[i] += s.sum_abs_delta
            self.sq_delta[i] += s.sq_delta
            self.sq_base[i] += s.sq_base
            self.magnitude_updated[i] += np.asarray(s.magnitude_updated, dtype=np.int64)
            self._add_precision_and_lines(i, s, r)
            if s.rank is not None and r.max_rank:
                self.rank_ratios[i].append(measures.rank_ratio(s.rank, r.max_rank))
                for f, ratios in self.spectrum_ratios.items():
                    if getattr(s, f) is not None:
                        ratios[i].append(measures.rank_ratio(getattr(s, f), r.max_rank))
        for (a, b), n in r.both.items():
            self.both[a, b] += n
            self.both[b, a] += n
        self.agreement += np.asarray(r.agreement, dtype=np.int64)
        self.multi += r.multi
        self.sign_agree += r.sign_agree
        self.magnitude_numel += np.asarray(r.magnitude_numel, dtype=np.int64)
        expected_both, agreement_expected = r.chance_strat()
        self.expected_both += expected_both
        self.agreement_expected_strat += agreement_expected
        for row in r.subspace_rows():
            self.subspaces.add(row)
        if self.coded and len(r.run_codes) == len(self.run_codes):
            self.run_codes += np.asarray(r.run_codes, dtype=np.int64)
        else:
            self.coded = False

    def _add_precision_and_lines(self, i: int, s: RunTensorStats, r: TensorResult) -> None:
        if len(s.ulp_histogram) == ULP_BINS:
            self.ulp_histogram[i] += np.asarray(s.ulp_histogram, dtype=np.int64)
        if s.dtype:
            self.compared_dtypes[i].add(s.dtype)
        if s.hidden_by_bf16 is not None:
            self.fine_tensors[i] += 1
            if s.true_dtype:
                self.true_dtypes[i].add(s.true_dtype)
            self.fine_numel[i] += r.numel
            self.fine_updated[i] += s.updated if s.true_updated is None else s.true_updated
            self.bf16_visible[i] += s.updated_bf16_visible
            self.bf16_hidden[i] += s.hidden_by_bf16
        if s.rows_updated is not None and len(r.shape) == 2:
            m, n = r.shape
            for axis, touched, total, length in (("rows", s.rows_updated, m, n), ("cols", s.cols_updated, n, m)):
                self.lines[axis][:, i] += (total, touched, total * overlap.touched_chance(s.updated, r.numel, length))

    @classmethod
    def of(cls, results, k: int, sweep_len: int = 0) -> "Stats":
        stats = cls(k, sweep_len)
        for r in results:
            stats.add(r)
        return stats

    # --- per run -------------------------------------------------------------------------------
    def density(self, i: int) -> float:
        return overlap.ratio(int(self.updated[i]), self.numel)

    def sparsity(self, i: int) -> float:
        return measures.sparsity(int(self.updated[i]), self.numel)

    def sweep_sparsity(self, i: int, j: int) -> float:
        return measures.sparsity(int(self.sweep[i, j]), self.numel)

    def mean_sparsity(self) -> float:
        vals = [self.sparsity(i) for i in range(self.k)]
        return float(np.mean(vals)) if vals and self.numel else math.nan

    def mean_rank_ratio(self, i: int) -> float:
        r = self.rank_ratios[i]
        return float(np.mean(r)) if r else math.nan

    def mean_rank_ratio_all(self) -> float:
        vals = [x for r in self.rank_ratios for x in r]
        return float(np.mean(vals)) if vals else math.nan

    def mean_spectrum_ratio(self, figure: str, i: int | None = None) -> float:
        """Unweighted mean over matrices (and runs, when i is None) of a spectrum figure / min(m, n)."""
        per_run = self.spectrum_ratios[figure]
        vals = [x for r in (per_run if i is None else [per_run[i]]) for x in r]
        return float(np.mean(vals)) if vals else math.nan

    def mean_abs_delta(self, i: int) -> float:
        return measures.mean_abs_delta(self.sum_abs[i], self.numel)

    def relative_norm(self, i: int) -> float:
        return measures.rel_delta_norm(self.sq_delta[i], self.sq_base[i])

    def true_sparsity(self, i: int) -> float:
        """1 − true updates / parameters, over the tensors whose run is stored finer than bf16; NaN if none."""
        return measures.sparsity(int(self.fine_updated[i]), int(self.fine_numel[i])) if self.fine_tensors[i] else math.nan

    def mean_true_sparsity(self) -> float:
        """Mean over the runs stored finer than bf16 of their true-update sparsity; NaN if none is."""
        vals = [self.true_sparsity(i) for i in range(self.k) if self.fine_tensors[i]]
        return float(np.mean(vals)) if vals else math.nan

    def hidden_by_bf16(self, i: int) -> float:
        """Share of true updates that bf16 hides, over the tensors whose run is stored finer than bf16; NaN if none."""
        return overlap.ratio(int(self.bf16_hidden[i]), int(self.fine_updated[i])) if self.fine_tensors[i] else math.nan

    def true_updated_count(self, i: int) -> int | None:
        """True updates in the stored precision, over the tensors whose run is stored finer than bf16; None if none."""
        return int(self.fine_updated[i]) if self.fine_tensors[i] else None

    def bf16_visible_count(self, i: int) -> int | None:
        """Positions whose bf16 casts differ, over the tensors whose pair is finer than bf16; None if none."""
        return int(self.bf16_visible[i]) if self.fine_tensors[i] else None

    def mean_hidden_by_bf16(self) -> float:
        """Hidden share pooled over every run with a pair finer than bf16 (Σ hidden / Σ true updates)."""
        fine = self.fine_tensors > 0
        return overlap.ratio(int(self.bf16_hidden[fine].sum()), int(self.fine_updated[fine].sum()))

    def touched(self, axis: str, i: int | None = None) -> tuple[float, float]:
        """(share of rows or columns of the 2-D matrices holding an update, its uniform-chance level), pooled
        line-weighted: Σ touched / Σ lines and Σ expected / Σ lines, for run i or over every run."""
        total, touched, expected = (self.lines[axis] if i is None else self.lines[axis][:, [i]]).sum(axis=1)
        return overlap.ratio(touched, total), overlap.ratio(expected, total)

    # --- per pair -----------------------------------------------------------------------------------
    def pair(self, a: int, b: int) -> dict:
        ua, ub, both = int(self.updated[a]), int(self.updated[b]), int(self.both[a, b])
        o1, o2 = overlap.one_sided(both, ua, ub)
        r1, r2 = overlap.one_sided_chance(ua, ub, self.numel)
        expected = float(self.expected_both[a, b])
        s1, s2 = overlap.one_sided_chance_strat(expected, ua, ub)
        return {
            "updated_a": ua, "updated_b": ub, "both": both,
            "o1": o1, "o2": o2, "o1_random": r1, "o2_random": r2,
            "jaccard": overlap.jaccard(both, ua, ub),
            "jaccard_random": overlap.jaccard_chance(ua, ub, self.numel),
            "o1_random_strat": s1, "o2_random_strat": s2,
            "jaccard_random_strat": overlap.jaccard_chance_strat(expected, ua, ub),
        }

    def pairs(self):
        for a in range(self.k):
            for b in range(a + 1, self.k):
                yield a, b, self.pair(a, b)

    def mean_jaccard(self) -> tuple[float, float]:
        """Mean over run pairs of (Jaccard, its chance level); NaN with fewer than two runs."""
        ps = [p for _, _, p in self.pairs()]
        return overlap.nan_mean([p["jaccard"] for p in ps]), overlap.nan_mean([p["jaccard_random"] for p in ps])

    def mean_jaccard_chance_strat(self) -> float:
        """Mean over run pairs of the stratified Jaccard chance level."""
        return overlap.nan_mean([p["jaccard_random_strat"] for _, _, p in self.pairs()])

    # --- across all K runs --------------------------------------------------------------------------
    def agreement_chance(self) -> np.ndarray:
        """Expected count of parameters updated by exactly j runs if runs were independent."""
        return overlap.agreement_chance([self.density(i) for i in range(self.k)]) * self.numel

    def consensus(self) -> float:
        """Fraction of parameters updated by every run."""
        return overlap.ratio(int(self.agreement[self.k]), self.numel)

    def consensus_chance(self) -> float:
        return float(self.agreement_chance()[self.k] / self.numel) if self.numel else math.nan

    def agreement_chance_strat(self) -> np.ndarray:
        """Expected count updated by exactly j runs under the stratified null (summed over tensor × |w0| bin)."""
        return self.agreement_expected_strat.copy()

    def consensus_chance_strat(self) -> float:
        return float(self.agreement_expected_strat[self.k] / self.numel) if self.numel else math.nan

    def union(self) -> float:
        """Fraction of parameters updated by at least one run."""
        return overlap.ratio(self.numel - int(self.agreement[0]), self.numel)

    def sign_agreement(self) -> float:
        """Among parameters updated by two or more runs, the fraction whose Δ has one sign in all of them."""
        return overlap.ratio(self.sign_agree, self.multi)

    def sign_agreement_chance(self) -> float:
        """sign_agreement if every run's sign were a fair coin (2^(1-j) for a parameter updated by j runs)."""
        return overlap.sign_agreement_chance(self.agreement)


@dataclass
class AnalysisResult:
    """The outcome of one analysis: per-tensor results plus what it was run on and with."""

    base_label: str
    base_path: str
    run_labels: list[str]
    run_paths: list[str]
    criterion: Criterion
    sweep: tuple[float, ...]
    device: str
    tensors: dict[str, TensorResult] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    planned_numel: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    tied: dict[str, str] = field(default_factory=dict)  # alias -> primary name, in the base
    compare_dtype: str = "stored"
    run_read_as: list[str] = field(default_factory=list)  # per run: its layout and stored dtypes, "fsdp, fp32"

    @property
    def k(self) -> int:
        return len(self.run_labels)

    def opening(self) -> "AnalysisResult":
        """A copy of what was compared and how, without tensors, sharing no list with this one (for a consumer)."""
        return replace(self, tensors={}, skipped=list(self.skipped), notes=list(self.notes), planned=list(self.planned),
                       planned_numel=dict(self.planned_numel), complete=False, tied=dict(self.tied),
                       run_labels=list(self.run_labels), run_paths=list(self.run_paths),
                       run_read_as=list(self.run_read_as))

    def take(self, records) -> None:
        """Tensors the analysis finished (a Progress's or a Computed's records), by name: how each consumer
        of the event stream, the CLI and the explorer, fills the result that `Opened` handed it."""
        for r in records:
            self.tensors[r.name] = r

    def finish(self, complete: bool, notes: list[str]) -> None:
        """The stream's end (`Finished`): whether every planned tensor was computed, and the notes it added."""
        self.complete = complete
        self.notes += [n for n in notes if n not in self.notes]

    def stats(self, names=None) -> Stats:
        names = self.tensors.keys() if names is None else names
        return Stats.of((self.tensors[n] for n in names if n in self.tensors), self.k, len(self.sweep))


@dataclass
class MatrixDetail:
    """What the two views draw for one tensor and a set of chosen runs."""

    name: str
    shape: tuple[int, ...]
    runs: tuple[int, ...]
    cell_numel: np.ndarray  # (R, C) parameters per cell of the map
    updated: np.ndarray  # (len(runs), R, C) parameters each chosen run updated, per cell
    consensus: np.ndarray  # (R, C) parameters every chosen run updated, per cell
    log2_bins: np.ndarray  # left edges: bin x holds |Δ| in [2^x, 2^(x+1)), ends clamped
    log2_counts: np.ndarray  # (len(runs), bins) parameters per bin (Δ = 0 and NaN/Inf left out)
    zero: np.ndarray  # (len(runs),) parameters with Δ exactly 0
    tolerance_log2: float | None  # log2 of the atol tolerance as the stored dtype rounds it; None otherwise

    def resampled(self, rows: int, cols: int) -> "MatrixDetail":
        """The same counts merged into at most rows × cols cells (cells of the finer grid summed)."""
        r0, c0 = self.cell_numel.shape
        rows, cols = max(1, min(rows, r0)), max(1, min(cols, c0))
        ri, ci = (np.arange(r0) * rows) // r0, (np.arange(c0) * cols) // c0

        def merge(a: np.ndarray) -> np.ndarray:
            out = np.zeros(a.shape[:-2] + (rows, cols), dtype=np.int64)
            np.add.at(out, (..., ri[:, None], ci[None, :]), a)
            return out

        return replace(self, cell_numel=merge(self.cell_numel), updated=merge(self.updated),
                       consensus=merge(self.consensus))

    def fraction(self, which: int | None) -> np.ndarray:
        """Updated fraction per cell: of chosen run `which` (its position in runs), or by every chosen run."""
        counts = self.consensus if which is None else self.updated[which]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.cell_numel > 0, counts / np.maximum(self.cell_numel, 1), np.nan)
