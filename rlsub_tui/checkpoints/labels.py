"""The name each checkpoint goes by, from its path or NAME=PATH: derived here and nowhere else (no torch)."""

from __future__ import annotations

from pathlib import Path

from rlsub_tui.checkpoints.locate import FSDP_SHARD, parse_run_spec, unique_labels
from rlsub_tui.checkpoints.step_folders import NESTED, STEP_DIR

VERL_ROLES = ("actor", "critic")  # the folders verl saves each role's rank files in


def _step_folder(path: Path) -> Path | None:
    """The step folder (checkpoint-N, global_step_N, ...) a checkpoint is, or sits in as a trainer nests its
    Hugging Face copy (global_step_N/actor/huggingface) or its rank files (global_step_N/actor/model_world_size_2_
    rank_0.pt); None for any other checkpoint."""
    path = path.parent if FSDP_SHARD.match(path.name) else path
    for nested in ("", *NESTED):
        inner = Path(nested).parts
        if len(path.parts) <= len(inner) or tuple(path.parts[len(path.parts) - len(inner):]) != inner:
            continue
        folder = path.parents[len(inner) - 1] if inner else path
        if STEP_DIR.match(folder.name) and folder.parent.name:
            return folder
    return None


def checkpoint_label(path: str) -> str:
    """The name a checkpoint goes by: for a step of a training run (r/seed1/checkpoint-60, or its nested
    huggingface/ copy) the run's folder name, seed1; else the last part of its path (the path itself when it
    has none)."""
    p = Path(path.rstrip("/"))
    step = _step_folder(p)
    if step is not None:
        return step.parent.name
    p = p.parent if FSDP_SHARD.match(p.name) else p  # one rank's file stands for its save's folder
    if p.name in VERL_ROLES and p.parent.name and _holds_rank_files(p):
        return p.parent.name  # verl's role folder (r/seed1/actor) goes by the run it belongs to
    return p.name or path


def _holds_rank_files(folder: Path) -> bool:
    try:
        return any(FSDP_SHARD.match(f.name) for f in folder.iterdir())
    except OSError:
        return False


def _step_label(path: str) -> str:
    """RUN@STEP for a step checkpoint (seed1@60), else its label."""
    step = _step_folder(Path(path.rstrip("/")))
    if step is None:
        return checkpoint_label(path)
    return f"{step.parent.name}@{STEP_DIR.match(step.name).group(1)}"


def run_labels(specs: list[str]) -> list[str]:
    """Unique labels of RUN arguments: NAME of NAME=PATH, else the checkpoint's label; steps of one training run
    named together are told apart by their step (seed1@20, seed1@60); other repeats get -2, -3, ..."""
    parsed = list(map(parse_run_spec, specs))
    wanted = [name or checkpoint_label(path) for name, path in parsed]
    clash = {w for w in wanted if wanted.count(w) > 1}
    wanted = [w if name or w not in clash else _step_label(path) for w, (name, path) in zip(wanted, parsed)]
    return unique_labels(wanted)


def run_paths(specs: list[str]) -> list[str]:
    """The PATH part of each RUN argument."""
    return [path for _, path in map(parse_run_spec, specs)]
