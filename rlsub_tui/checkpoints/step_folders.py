"""Finding training timelines: RUN arguments that are folders of step checkpoints (no torch: the explorer uses it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from rlsub_tui.checkpoints.locate import locate, parse_run_spec
from rlsub_tui.util.errors import CheckpointError, InputError

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
