"""One tensor across K runs: its masks counted chunk by chunk, then ranks, into the tensor's record."""

from __future__ import annotations

import torch

from rlsub_tui.checkpoints.dtypes import dtype_name, dtypes_label
from rlsub_tui.compute.accumulate import TensorAccumulator
from rlsub_tui.compute.kernels import chunk_elements, one_cpu_thread, stored_delta
from rlsub_tui.compute.precision import TrueUpdates
from rlsub_tui.compute.subspace import directions, figures_and_directions, needed_k, pair_rows
from rlsub_tui.records.criteria import Criterion, RunTensorStats
from rlsub_tui.records.results import TensorResult
from rlsub_tui.records.spectrum import RankFigures
from rlsub_tui.records.subspaces import SubspaceRow, pooled


def compute_tensor(base: torch.Tensor, runs: list[torch.Tensor], criterion: Criterion,
                   sweep: tuple[float, ...] = (), want_rank: bool = True,
                   ranks: list[RankFigures | None] | None = None,
                   dtypes: list[torch.dtype] | None = None, stored: list[torch.Tensor | None] | None = None,
                   true_dtypes: list[torch.dtype | None] | None = None, want_subspaces: bool = False) -> TensorResult:
    """Masks, counts, pair overlaps, agreement and ranks for one tensor, as its record (named by the caller).

    `base` and every run must have one shape. `dtypes[j]` is the dtype run j is compared in (default:
    the base's); run j must already be in it, the base is cast to it chunk by chunk, so each run's
    numbers depend on its own pair alone. A position whose Δ is NaN/Inf counts as updated by that
    run and is left out of its Σ|Δ|, ‖Δ‖², ‖W0‖² and of the sign agreement.
    `ranks`, when given, are known ranks with their spectra (from the cache) and are not recomputed.
    `stored[j]`, where `true_dtypes[j]` is set, is run j as stored (finer than bf16, compared coarser): its true
    updates and their bf16 visibility are counted on the same chunks in that precision (precision.TrueUpdates).
    `want_subspaces` (with the rank): the subspace overlaps of the runs' top singular directions (subspace.py).
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
    rank_note, subspaces = _set_ranks(stats, base, runs, dtypes, want_rank, ranks, want_subspaces)
    return TensorResult(
        name="", dtype=dtypes_label(dtypes), shape=list(base.shape), numel=base.numel(),  # the caller names it
        runs=stats, both=cross.both, agreement=[int(x) for x in cross.agreement], multi=cross.multi,
        sign_agree=cross.sign_agree, magnitude_numel=[int(x) for x in cross.magnitude_numel],
        notes=[rank_note] if rank_note else [], run_codes=cross.run_codes, subspaces=subspaces)


def _set_ranks(stats: list[RunTensorStats], base: torch.Tensor, runs: list[torch.Tensor],
               dtypes: list[torch.dtype], want_rank: bool, ranks: list[RankFigures | None] | None,
               want_subspaces: bool = False) -> tuple[str | None, list]:
    """Set each run's rank figures (known ones reused); the note when a NaN/Inf update keeps one out, and with
    `want_subspaces` the subspace overlaps of every pair and of each run with the base (subspace.py), whose
    directions come from the rank's own decomposition (a known rank is then taken again with them)."""
    rank_note, found = None, []
    subspaces = want_rank and want_subspaces and base.ndim in (2, 3)
    for j, (s, run) in enumerate(zip(stats, runs)):
        rank = ranks[j] if ranks is not None else None
        dirs = None
        if (rank is None or subspaces) and want_rank and base.ndim in (2, 3):
            if s.nonfinite:
                rank_note = "rank not computed: NaN/Inf in the update"
            else:
                bj = base if base.dtype == dtypes[j] else base.to(dtypes[j])
                rank, dirs = figures_and_directions(stored_delta(bj, run), rank, subspaces)
        s.set_rank(rank)
        found.append(dirs)
    if not subspaces or not any(d is not None for d in found):
        return rank_note, []
    return rank_note, _subspace_rows(base, found)


def _subspace_rows(base: torch.Tensor, found: list) -> list[list]:
    """Every pair's and every run's overlap with the base, per side and k; a stack's pooled over its experts."""
    experts = base.unsqueeze(0) if base.ndim == 2 else base
    per_run = [[d] if base.ndim == 2 and d is not None else d for d in found]
    shape = tuple(experts.shape[1:])
    rows = []
    for e, w0 in enumerate(experts):
        runs_e = [d[e] if d is not None else None for d in per_run]
        widest = max((d.energy_90 for d in runs_e if d is not None), default=0)
        base_dirs = directions(w0, needed_k(widest, min(shape)))
        rows += pair_rows(runs_e, base_dirs, shape)
    groups: dict[tuple, list[SubspaceRow]] = {}
    for r in rows:
        groups.setdefault((r.a, r.b, r.side, r.rule), []).append(r)
    return [pooled(g).to_list() for g in groups.values()]


def _set_precision_and_lines(stats: RunTensorStats, figures, counts) -> None:
    """Copy a run's precision.PrecisionFigures and structure.LineCounts (either may be None) into its stats."""
    if figures is not None:
        stats.ulp_histogram = list(figures.ulp_histogram)
        stats.updated_bf16_visible, stats.hidden_by_bf16 = figures.visible, figures.hidden
        if figures.hidden is not None:  # compared in a precision finer than bf16: its updates are the true ones
            stats.true_updated, stats.true_dtype = stats.updated, stats.dtype
    if counts is not None:
        stats.rows_updated, stats.cols_updated = counts.rows, counts.cols


