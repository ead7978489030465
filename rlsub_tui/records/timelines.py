"""What the timeline pass finds: per tensor, run and step, counts against the base and the step before (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rlsub_tui.records.criteria import Criterion


@dataclass
class TimelineRow:
    """One tensor of one run at one step: against the base and against the step `gap` checkpoints before."""

    tensor: str
    run: str
    step: int
    prev_step: int | None  # None: fewer than `gap` checkpoints before this one
    numel: int
    updated_vs_base: int
    updated_vs_prev: int | None
    both_prev: int | None  # updated in this step and in the previous step (same gap)
    prev_updated: int | None  # updated in the previous step
    union_so_far: int
    patch_bytes: int | None
    dense_bytes: int

    @property
    def overlap_prev(self) -> float | None:
        if self.both_prev is None or not self.updated_vs_prev:
            return None
        return self.both_prev / self.updated_vs_prev

    @property
    def overlap_prev_random(self) -> float | None:
        return None if self.prev_updated is None or not self.numel else self.prev_updated / self.numel


@dataclass
class RunTimeline:
    """One timeline's steps and, per step index (0 = never), how many parameters first changed there."""

    label: str
    path: str
    steps: list[int]
    first_changed: np.ndarray  # length len(steps) + 1


@dataclass
class TimelineResult:
    criterion: Criterion
    gap: int
    runs: list[RunTimeline]
    rows: list[TimelineRow] = field(default_factory=list)
    skipped: list = field(default_factory=list)
    compare_dtype: str = "stored"  # the --compare-dtype policy every pair of the timeline was compared under
