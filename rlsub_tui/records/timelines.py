"""What the timeline pass finds: per tensor, run and step, counts against the base and the step before (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rlsub_tui.records.criteria import Criterion

INDEX_BYTES = 4  # a sparse patch stores each changed position as a 4-byte index plus the new stored value
# what the patch/dense figure of a timeline step means, wherever it is printed
PATCH_DENSE = (f"patch/dense: bytes of a lossless sparse patch from the step before (a {INDEX_BYTES}-byte index plus the new "
               "stored value per changed entry) over the dense tensor's bytes; above 100% when more than a third "
               "of bf16 entries (half of fp32 ones) change, 200% when two thirds of bf16 entries do")


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
    step_paths: list[str] = field(default_factory=list)  # each step's checkpoint, in step order


@dataclass
class TimelineResult:
    criterion: Criterion
    gap: int
    runs: list[RunTimeline]
    rows: list[TimelineRow] = field(default_factory=list)
    skipped: list = field(default_factory=list)
    compare_dtype: str = "stored"  # the --compare-dtype policy every pair of the timeline was compared under
