"""The name each checkpoint goes by, from its path or NAME=PATH: derived here and nowhere else (no torch)."""

from __future__ import annotations

from pathlib import Path

from rlsub_tui.checkpoints.locate import parse_run_spec, unique_labels


def checkpoint_label(path: str) -> str:
    """The last part of a checkpoint's path (the path itself when it has none)."""
    return Path(path.rstrip("/")).name or path


def run_labels(specs: list[str]) -> list[str]:
    """Unique labels of RUN arguments: NAME of NAME=PATH, else the checkpoint's label; repeats get -2, -3, ..."""
    return unique_labels([name or checkpoint_label(path) for name, path in map(parse_run_spec, specs)])


def run_paths(specs: list[str]) -> list[str]:
    """The PATH part of each RUN argument."""
    return [path for _, path in map(parse_run_spec, specs)]
