"""Finding training timelines: RUN arguments that are folders of step checkpoints (no torch: the explorer uses it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlsub_tui.criteria import Criterion
from rlsub_tui.errors import CheckpointError, InputError
from rlsub_tui.locate import locate, parse_run_spec

STEP_DIR = re.compile(r"^(?:checkpoint|global_step|step|iter)[-_](\d+)$")
# Where trainers put the Hugging Face copy inside a step directory (verl: global_step_N/actor/huggingface).
NESTED = ("huggingface", "actor/huggingface", "hf", "actor")


@dataclass(frozen=True)
class Timeline:
    """A directory of step checkpoints, ordered by step."""

    path: Path
    steps: list[int]
    checkpoints: list[Path]


def _is_checkpoint(path: Path) -> bool:
    try:
        locate(str(path))
        return True
    except CheckpointError:
        return False


def _step_checkpoint(folder: Path) -> Path | None:
    for sub in ("", *NESTED):
        candidate = folder / sub if sub else folder
        if candidate.is_dir() and _is_checkpoint(candidate):
            return candidate
    inside = [c for c in sorted(folder.iterdir()) if c.is_dir() and _is_checkpoint(c)]
    return inside[0] if len(inside) == 1 else None


def find_timeline(source: str) -> Timeline | None:
    """The timeline a RUN argument names: a directory holding no checkpoint but two or more step checkpoints."""
    path = Path(source).expanduser()
    if not path.is_dir() or _is_checkpoint(path):
        return None
    found: dict[int, Path] = {}
    for child in sorted(path.iterdir()):
        m = STEP_DIR.match(child.name)
        if m is None or not child.is_dir():
            continue
        step = int(m.group(1))
        if step in found:
            raise InputError(f"{path}: {found[step].name} and {child.name} are both step {step}.")
        ckpt = _step_checkpoint(child)
        if ckpt is None:
            raise InputError(f"{child}: holds no checkpoint (looked in it and in {', '.join(NESTED)}).")
        found[step] = ckpt
    if len(found) < 2:
        return None
    steps = sorted(found)
    return Timeline(path, steps, [found[s] for s in steps])


@dataclass
class ResolvedRuns:
    """RUN arguments with each timeline replaced by its last step (for overlap and agreement)."""

    paths: list[str]
    labels: list[str | None]
    timelines: dict[int, Timeline] = field(default_factory=dict)  # run index -> its timeline


def resolve_runs(specs: list[str]) -> ResolvedRuns:
    out = ResolvedRuns([], [])
    for i, spec in enumerate(specs):
        name, path = parse_run_spec(spec)
        t = find_timeline(path)
        if t is not None:
            out.timelines[i] = t
            name = name or t.path.resolve().name
            path = str(t.checkpoints[-1])
        out.paths.append(path)
        out.labels.append(name)
    return out


def run_specs(resolved: ResolvedRuns) -> list[str]:
    """The resolved runs as RUN arguments again (NAME=PATH where a timeline gave the name)."""
    out = []
    for path, label in zip(resolved.paths, resolved.labels):
        plain = label is None or "=" in label or "/" in label
        out.append(path if plain else f"{label}={path}")
    return out


# What the timeline pass (timeline.py) finds: plain data, no torch.
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
