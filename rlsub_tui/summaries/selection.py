"""Choosing runs: a selection of the K runs, and pooled figures restricted to it (from the per-tensor records)."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np

from rlsub_tui.records import overlap
from rlsub_tui.records.results import Stats
from rlsub_tui.util.errors import InputError


def parse_runs(spec: str, labels: list[str]) -> tuple[int, ...]:
    """Run indices (0-based, sorted) from 'grpo-lowlr*', '1,2,3', '1-3' or labels, comma separated."""
    chosen: set[int] = set()
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        chosen |= _match(item, labels)
    if not chosen:
        raise InputError(f"--runs {spec!r}: selects no run; the runs are {', '.join(labels)}.")
    return tuple(sorted(chosen))


def _match(item: str, labels: list[str]) -> set[int]:
    lo, dash, hi = item.partition("-")
    if item.isdigit() or (dash and lo.isdigit() and hi.isdigit()):
        first, last = (int(item), int(item)) if not dash else (int(lo), int(hi))
        if not 1 <= first <= last <= len(labels):
            raise InputError(f"--runs {item}: run numbers go from 1 to {len(labels)}.")
        return set(range(first - 1, last))
    hits = {i for i, label in enumerate(labels) if fnmatch.fnmatchcase(label, item)}
    if not hits:
        raise InputError(f"--runs {item}: matches no run; the runs are {', '.join(labels)}.")
    return hits


def subset_agreement(run_codes: np.ndarray, runs: tuple[int, ...]) -> np.ndarray:
    """Parameters updated by exactly j of the chosen runs (j = 0..len(runs)), from per-code counts."""
    codes = np.arange(len(run_codes))
    hits = sum(((codes >> i) & 1) for i in runs) if runs else np.zeros_like(codes)
    return np.bincount(hits, weights=run_codes, minlength=len(runs) + 1).astype(np.int64)


@dataclass
class OverlapFigure:
    """A mean overlap over run pairs and its two chance levels (pooled, stratified); lift = observed / chance."""

    observed: float
    chance: float
    chance_strat: float = math.nan

    @property
    def lift(self) -> float:
        return overlap.lift(self.observed, self.chance)

    @property
    def lift_strat(self) -> float:
        return overlap.lift(self.observed, self.chance_strat)


class SelectedStats:
    """The pooled figures of a Stats over a chosen subset of its runs."""

    def __init__(self, stats: Stats, runs: tuple[int, ...]):
        self.stats = stats
        self.runs = tuple(runs)

    @property
    def numel(self) -> int:
        return self.stats.numel

    @property
    def all_runs(self) -> bool:
        return self.runs == tuple(range(self.stats.k))

    def sparsity(self, i: int) -> float:
        return self.stats.sparsity(i)

    @property
    def fine_runs(self) -> tuple[int, ...]:
        """The chosen runs stored finer than bf16 here (their true updates were counted)."""
        return tuple(i for i in self.runs if self.stats.fine_tensors[i])

    def compared_in(self) -> str:
        """The dtypes the chosen runs were compared in here, each once: 'bf16', or 'bf16/fp32'."""
        return "/".join(sorted({d for i in self.runs for d in self.stats.compared_dtypes[i]})) or "–"

    def stored_in(self) -> str:
        """The precisions the chosen runs' true updates were counted in here: 'fp32'."""
        return "/".join(sorted({d for i in self.fine_runs for d in self.stats.true_dtypes[i]})) or "–"

    def pairs(self):
        for x, a in enumerate(self.runs):
            for b in self.runs[x + 1:]:
                yield a, b, self.stats.pair(a, b)

    def one_sided(self) -> OverlapFigure:
        """Mean of o1 and o2 over the chosen pairs (every ordered pair's |A∩B|/|A|), and of their chance levels."""
        ps = [p for _, _, p in self.pairs()]
        return OverlapFigure(overlap.nan_mean([p["o1"] for p in ps] + [p["o2"] for p in ps]),
                             overlap.nan_mean([p["o1_random"] for p in ps] + [p["o2_random"] for p in ps]),
                             overlap.nan_mean([p["o1_random_strat"] for p in ps] + [p["o2_random_strat"] for p in ps]))

    def jaccard(self) -> OverlapFigure:
        ps = [p for _, _, p in self.pairs()]
        return OverlapFigure(overlap.nan_mean([p["jaccard"] for p in ps]), overlap.nan_mean([p["jaccard_random"] for p in ps]),
                             overlap.nan_mean([p["jaccard_random_strat"] for p in ps]))

    def agreement(self) -> np.ndarray | None:
        """Parameters updated by exactly j of the chosen runs; None when the records hold no run codes."""
        if self.all_runs:
            return self.stats.agreement.copy()
        if not self.stats.coded:
            return None
        return subset_agreement(self.stats.run_codes, self.runs)

    def agreement_chance(self) -> np.ndarray:
        return overlap.agreement_chance([self.stats.density(i) for i in self.runs]) * self.numel

    def consensus(self) -> OverlapFigure:
        """Fraction of parameters updated by every chosen run, and the product of their densities."""
        agree = self.agreement()
        if agree is None or not self.numel or len(self.runs) < 2:
            return OverlapFigure(math.nan, math.nan)
        strat = self.stats.consensus_chance_strat() if self.all_runs else math.nan  # recorded for all K only
        return OverlapFigure(agree[-1] / self.numel, float(self.agreement_chance()[-1] / self.numel), strat)

    def sign_agreement(self) -> float:
        """As Stats.sign_agreement, which the records hold for all K runs only (NaN for a subset)."""
        return self.stats.sign_agreement() if self.all_runs else math.nan
