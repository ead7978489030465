"""Subspace overlap: do the runs move the same directions, not only the same entries? (no torch)

For two k-dimensional subspaces with orthonormal bases A and B of one space of dimension d (the m rows of a
matrix: "left", or its n columns: "right"), overlap = ‖AᵀB‖_F² / k, the mean squared cosine of their principal
angles: 1 for the same subspace, k/d expected for independent uniformly random ones (its chance level). Each
run's subspace is the span of its update's top-k singular vectors; k is the smaller energy rank at 90% of the
two ("e90"), or a fixed k of FIXED_K both have. The base weight's own top-k subspace stands in for a run
("does the update write into the directions the base already uses?").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FIXED_K = (1, 8, 32)
RULES = ("e90",) + tuple(f"k{k}" for k in FIXED_K)
SIDES = ("left", "right")
BASE = -1  # the run index that stands for the base weight


# subspaces.csv: its columns and what each holds
SUBSPACES_CSV = {
    "tensor": "a 2-D matrix (or a stack of expert matrices, pooled over its experts)",
    "run_a": "run A", "run_b": "run B, or `base` for the base weight's own top-k subspace",
    "side": "left: the span of the top-k left singular vectors (in the m-dimensional column space); right: of "
            "the top-k right singular vectors (n-dimensional)",
    "k_rule": "e90: k = the smaller energy rank at 90% of the two; k1, k8, k32: a fixed k both have",
    "k": "the subspaces' dimension (summed over the experts of a stack)",
    "overlap": "‖U_Aᵀ U_B‖_F² / k, the mean squared cosine of the principal angles (1: the same subspace)",
    "chance": "k / m (left) or k / n (right): the overlap of independent uniformly random k-dim subspaces",
    "lift": "overlap / chance",
}


def chance_of(k: int, dim: int) -> float:
    """The overlap of independent uniformly random k-dimensional subspaces of a dim-dimensional space."""
    return k / dim if dim else math.nan


@dataclass(frozen=True)
class SubspaceRow:
    """One matrix's overlap of run a's and run b's (BASE: the base weight's) top-k subspaces on one side; for a
    stack of expert matrices, pooled over the experts (k their sum, overlap and chance k-weighted)."""

    a: int
    b: int
    side: str
    rule: str
    k: int
    overlap: float
    chance: float

    @property
    def lift(self) -> float:
        return self.overlap / self.chance if self.chance else math.nan

    def to_list(self) -> list:
        return [self.a, self.b, self.side, self.rule, self.k, self.overlap, self.chance]

    @classmethod
    def from_list(cls, x: list) -> "SubspaceRow":
        return cls(int(x[0]), int(x[1]), str(x[2]), str(x[3]), int(x[4]), float(x[5]), float(x[6]))


def pooled(rows: list[SubspaceRow]) -> SubspaceRow | None:
    """Rows of one (a, b, side, rule) over several matrices (or experts) as one: k summed, overlap and chance
    k-weighted (each direction counts once); None for no rows."""
    if not rows:
        return None
    k = sum(r.k for r in rows)
    first = rows[0]
    return SubspaceRow(first.a, first.b, first.side, first.rule, k, sum(r.k * r.overlap for r in rows) / k,
                       sum(r.k * r.chance for r in rows) / k)


class SubspaceTotals:
    """Σk·overlap, Σk·chance and Σk per (a, b, side, rule), added tensor by tensor (a node's pooled figures)."""

    def __init__(self):
        self.sums: dict[tuple[int, int, str, str], list[float]] = {}

    def add(self, row: SubspaceRow) -> None:
        acc = self.sums.setdefault((row.a, row.b, row.side, row.rule), [0.0, 0.0, 0])
        acc[0] += row.k * row.overlap
        acc[1] += row.k * row.chance
        acc[2] += row.k

    def figure(self, side: str, rule: str = "e90", runs: tuple[int, ...] | None = None, base: bool = False
               ) -> tuple[float, float]:
        """(overlap, chance) pooled k-weighted over the chosen runs' pairs (base: each chosen run against the
        base weight instead); NaN when no matrix has them."""
        chosen = None if runs is None else set(runs)
        total = [0.0, 0.0, 0]
        for (a, b, s, r), acc in self.sums.items():
            if s != side or r != rule or (b == BASE) != base:
                continue
            if chosen is not None and (a not in chosen or (b != BASE and b not in chosen)):
                continue
            total = [t + x for t, x in zip(total, acc)]
        if not total[2]:
            return math.nan, math.nan
        return total[0] / total[2], total[1] / total[2]

    def pair(self, a: int, b: int, side: str, rule: str = "e90") -> tuple[float, float]:
        """(overlap, chance) of one pair (b may be BASE), pooled over the matrices."""
        acc = self.sums.get((min(a, b), max(a, b), side, rule) if b != BASE else (a, b, side, rule))
        if not acc or not acc[2]:
            return math.nan, math.nan
        return acc[0] / acc[2], acc[1] / acc[2]
