"""Training timelines: a run saved at several steps, followed tensor by tensor from the base to its last step."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch

from rlsub_tui.checkpoints.checkpoint import Checkpoint, open_checkpoint
from rlsub_tui.checkpoints.dtypes import pair_dtype
from rlsub_tui.checkpoints.labels import checkpoint_label

# the result types are records (no torch), so a UI process can unpickle them from an analysis process
from rlsub_tui.checkpoints.step_folders import Timeline
from rlsub_tui.compute.engine import TensorPlan, plan_tensors
from rlsub_tui.compute.kernels import CHUNK_ELEMENTS, update_mask
from rlsub_tui.records.criteria import Criterion
from rlsub_tui.records.events import Progress
from rlsub_tui.records.timelines import INDEX_BYTES, RunTimeline, TimelineResult, TimelineRow
from rlsub_tui.util.errors import InputError


def _check_agreement(t: Timeline, ckpts: list[Checkpoint]) -> None:
    first = ckpts[0]
    for c in ckpts[1:]:
        for name, info in first.tensors.items():
            other = c.tensors.get(name)
            if other is None:
                raise InputError(f"timeline {t.path}: '{name}' is in {first.source} but not in {c.source}.")
            if other.shape != info.shape:
                raise InputError(f"timeline {t.path}: '{name}' has shape {list(other.shape)} in {c.source} but "
                                 f"{list(info.shape)} in {first.source}.")
        extra = next((n for n in c.tensors if n not in first.tensors), None)
        if extra is not None:
            raise InputError(f"timeline {t.path}: '{extra}' is in {c.source} but not in {first.source}.")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def patch_positions(prev: torch.Tensor, cur: torch.Tensor) -> int:
    """Positions whose stored bits differ: what a lossless patch from `prev` to `cur` must carry."""
    if prev.dtype != cur.dtype:
        return cur.numel()
    return int(torch.count_nonzero(_bits(prev) != _bits(cur)))


class TimelineAnalysis:
    """A base and one or more timelines, opened from headers; `run()` streams through the tensors."""

    def __init__(self, base: str, timelines: list[tuple[str, Timeline]], criterion: Criterion, gap: int = 1,
                 policy: str = "stored"):
        if gap < 1:
            raise InputError(f"--step-gap {gap}: must be 1 or more.")
        self.criterion, self.gap, self.policy = criterion, gap, policy
        self.base = open_checkpoint(base, label=checkpoint_label(base))
        self.timelines = timelines
        self.steps: list[list[Checkpoint]] = []
        for label, t in timelines:
            ckpts = [open_checkpoint(str(p), label=f"{label}@{s}", base=self.base) for s, p in zip(t.steps, t.checkpoints)]
            _check_agreement(t, ckpts)
            self.steps.append(ckpts)
        every = [c for ckpts in self.steps for c in ckpts]
        # each step against the base in the dtype the run table uses for that pair (--compare-dtype included)
        planning = plan_tensors(self.base, every, policy=policy)
        self.plans, skipped = planning.plans, planning.skipped
        runs = [RunTimeline(label, str(t.path), list(t.steps), np.zeros(len(t.steps) + 1, dtype=np.int64),
                            [str(c) for c in t.checkpoints]) for label, t in timelines]
        self.result = TimelineResult(criterion, gap, runs, skipped=skipped, compare_dtype=policy)

    def run(self, on_progress: Callable[[Progress], None] | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> TimelineResult | None:
        """Every tensor through every timeline; None if cancelled() turns true between tensors."""
        done = 0
        for progress in self.stream(cancelled):
            done = progress.done
            if on_progress:
                on_progress(progress)
        return self.result if done == len(self.plans) else None

    def stream(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Progress]:
        """Every tensor through every timeline, one Progress each, into self.result; stops when cancelled()."""
        start = time.perf_counter()
        total = sum(p.nbytes for p in self.plans)
        done = 0
        for i, plan in enumerate(self.plans):
            if cancelled():
                return
            base = self.base.read(plan.name)
            offset = 0
            for r, ckpts in enumerate(self.steps):
                names = plan.run_names[offset:offset + len(ckpts)]
                dtypes = plan.run_dtypes[offset:offset + len(ckpts)]
                offset += len(ckpts)
                self._follow(plan, base, r, ckpts, names, dtypes)
            del base
            done += plan.nbytes
            yield Progress(i + 1, len(self.plans), done, total, time.perf_counter() - start, None, False)

    def _follow(self, plan: TensorPlan, base: torch.Tensor, r: int, ckpts: list[Checkpoint], names: list[str],
                dtypes: list[torch.dtype]) -> None:
        """One tensor through one timeline, holding the base, the previous and the current version at most.

        `base` is as stored; a mask compares in the dtype the policy gives its own pair (a step with the base,
        or a step with the one `gap` before it), patches compare the stored bits.
        """
        run = self.result.runs[r]
        union = torch.zeros(plan.shape, dtype=torch.bool)
        first = torch.zeros(plan.shape, dtype=torch.int16 if len(ckpts) < 32767 else torch.int32)
        step_masks: dict[int, torch.Tensor] = {}  # extended index (0 = base) -> mask of the step ending there
        held: tuple[int, torch.Tensor] = (0, base)
        for j in range(1, len(ckpts) + 1):
            cur = ckpts[j - 1].read(names[j - 1])
            cur_cmp = cur.to(dtypes[j - 1])
            vs_base = update_mask(base.to(dtypes[j - 1]), cur_cmp, self.criterion)
            first[vs_base & ~union] = j
            union |= vs_base
            row = TimelineRow(plan.name, run.label, run.steps[j - 1], None, plan.numel, int(torch.count_nonzero(vs_base)),
                              None, None, None, int(torch.count_nonzero(union)), None,
                              plan.numel * cur.element_size())
            p = j - self.gap
            if p >= 0:
                prev = held[1] if held[0] == p else (base if p == 0 else ckpts[p - 1].read(names[p - 1]))
                in_dtype = dtypes[j - 1] if p == 0 else pair_dtype(prev.dtype, cur.dtype, self.policy)
                step = update_mask(prev.to(in_dtype), cur.to(in_dtype), self.criterion)
                row.prev_step = 0 if p == 0 else run.steps[p - 1]
                row.updated_vs_prev = int(torch.count_nonzero(step))
                row.patch_bytes = patch_positions(prev, cur) * (INDEX_BYTES + cur.element_size())
                earlier = step_masks.pop(p, None)
                if earlier is not None:
                    row.both_prev = int(torch.count_nonzero(step & earlier))
                    row.prev_updated = int(torch.count_nonzero(earlier))
                step_masks[j] = step
                del prev
            self.result.rows.append(row)
            if self.gap == 1:  # with a longer gap the previous checkpoint is read again when needed
                held = (j, cur)
        flat = first.reshape(-1).numpy()
        for start in range(0, flat.size, CHUNK_ELEMENTS):  # np.bincount widens to int64: keep that small
            run.first_changed += np.bincount(flat[start:start + CHUNK_ELEMENTS], minlength=len(ckpts) + 1)

    def close(self) -> None:
        self.base.close()
        for ckpts in self.steps:
            for c in ckpts:
                c.close()

