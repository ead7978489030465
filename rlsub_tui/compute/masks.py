"""One tensor across K runs: its masks counted chunk by chunk, then ranks, into the tensor's record."""

from __future__ import annotations

import torch

from rlsub_tui.checkpoints.dtypes import dtype_name, dtypes_label
from rlsub_tui.compute.accumulate import TensorAccumulator
from rlsub_tui.compute.kernels import chunk_elements, one_cpu_thread, stored_delta
from rlsub_tui.compute.precision import TrueUpdates
from rlsub_tui.compute.rank import stacked_rank_figures
from rlsub_tui.records.criteria import Criterion, RunTensorStats
from rlsub_tui.records.results import TensorResult
from rlsub_tui.records.spectrum import RankFigures


def compute_tensor(base: torch.Tensor, runs: list[torch.Tensor], criterion: Criterion,
                   sweep: tuple[float, ...] = (), want_rank: bool = True,
                   ranks: list[RankFigures | None] | None = None,
                   dtypes: list[torch.dtype] | None = None, stored: list[torch.Tensor | None] | None = None,
                   true_dtypes: list[torch.dtype | None] | None = None) -> TensorResult:
    """Masks, counts, pair overlaps, agreement and ranks for one tensor, as its record (named by the caller).

    `base` and every run must have one shape. `dtypes[j]` is the dtype run j is compared in (default:
    the base's); run j must already be in it, the base is cast to it chunk by chunk, so each run's
    numbers depend on its own pair alone. A position whose Δ is NaN/Inf counts as updated by that
    run and is left out of its Σ|Δ|, ‖Δ‖², ‖W0‖² and of the sign agreement.
    `ranks`, when given, are known ranks with their spectra (from the cache) and are not recomputed.
    `stored[j]`, where `true_dtypes[j]` is set, is run j as stored (finer than bf16, compared coarser): its true
    updates and their bf16 visibility are counted on the same chunks in that precision (precision.TrueUpdates).
    Elementwise work runs over chunks (chunk_elements), so temporaries stay small whatever the tensor;
    accumulate.TensorAccumulator holds the per-chunk counts.
    """
    k = len(runs)
    dtypes = list(dtypes) if dtypes is not None else [base.dtype] * k
    acc = TensorAccumulator(base.dtype, dtypes, criterion, tuple(sweep), base.device, base.numel(),
                            shape=tuple(base.shape))
    flat_base = base.reshape(-1)
    flat_runs = [r.reshape(-1) for r in runs]
    fine = [(j, TrueUpdates(dt, criterion), stored[j].reshape(-1))
            for j, dt in enumerate(true_dtypes or []) if dt is not None]
    chunk = chunk_elements(base.device, k)
    with one_cpu_thread(base.device):
        for start in range(0, flat_base.numel(), chunk):
            acc.add_chunk(flat_base[start:start + chunk], [r[start:start + chunk] for r in flat_runs])
            for _, counter, run in fine:
                counter.add(flat_base[start:start + chunk], run[start:start + chunk])
    totals, cross = acc.finish()
    stats = [RunTensorStats(
        updated=t.updated, nonfinite=t.nonfinite, sum_abs_delta=t.sum_abs_delta, sq_delta=t.sq_delta,
        sq_base=t.sq_base, sweep=list(t.sweep), dtype=dtype_name(dt),
        magnitude_updated=[int(x) for x in cross.magnitude_updated[j]],
    ) for j, (t, dt) in enumerate(zip(totals, dtypes))]
    for j, s in enumerate(stats):
        _set_precision_and_lines(s, cross.precision[j], cross.lines[j])
    for j, counter, _ in fine:
        figures = counter.finish()
        stats[j].true_updated, stats[j].true_dtype = figures.true, dtype_name(counter.dtype)
        stats[j].updated_bf16_visible, stats[j].hidden_by_bf16 = figures.visible, figures.hidden
    rank_note = _set_ranks(stats, base, runs, dtypes, want_rank, ranks)
    return TensorResult(
        name="", dtype=dtypes_label(dtypes), shape=list(base.shape), numel=base.numel(),  # the caller names it
        runs=stats, both=cross.both, agreement=[int(x) for x in cross.agreement], multi=cross.multi,
        sign_agree=cross.sign_agree, magnitude_numel=[int(x) for x in cross.magnitude_numel],
        notes=[rank_note] if rank_note else [], run_codes=cross.run_codes)


def _set_ranks(stats: list[RunTensorStats], base: torch.Tensor, runs: list[torch.Tensor],
               dtypes: list[torch.dtype], want_rank: bool, ranks: list[RankFigures | None] | None) -> str | None:
    """Set each run's rank figures (known ones reused); the note when a NaN/Inf update keeps one out."""
    rank_note = None
    for j, (s, run) in enumerate(zip(stats, runs)):
        rank = ranks[j] if ranks is not None else None
        if rank is None and want_rank and base.ndim in (2, 3):
            if s.nonfinite:
                rank_note = "rank not computed: NaN/Inf in the update"
            else:
                bj = base if base.dtype == dtypes[j] else base.to(dtypes[j])
                rank = stacked_rank_figures(stored_delta(bj, run))
        s.set_rank(rank)
    return rank_note


def _set_precision_and_lines(stats: RunTensorStats, figures, counts) -> None:
    """Copy a run's precision.PrecisionFigures and structure.LineCounts (either may be None) into its stats."""
    if figures is not None:
        stats.ulp_histogram = list(figures.ulp_histogram)
        stats.updated_bf16_visible, stats.hidden_by_bf16 = figures.visible, figures.hidden
        if figures.hidden is not None:  # compared in a precision finer than bf16: its updates are the true ones
            stats.true_updated, stats.true_dtype = stats.updated, stats.dtype
    if counts is not None:
        stats.rows_updated, stats.cols_updated = counts.rows, counts.cols


