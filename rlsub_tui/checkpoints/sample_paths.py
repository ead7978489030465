"""Where the bundled sample checkpoints are, whether installed from the checkout or as a wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rlsub_tui.util.errors import InputError

# Runs the explorer opens when started with no arguments (see sample_data/README.md).
DEFAULT_RUN_PREFIX = "grpo-"


def sample_dir() -> Path:
    candidates = []
    try:
        candidates.append(Path(str(resources.files("rlsub_tui.sample_data"))))
    except (ModuleNotFoundError, TypeError):
        pass
    # a checkout on sys.path that is not installed: sample_data/ beside rlsub_tui/
    candidates.append(Path(__file__).resolve().parents[2] / "sample_data")
    for c in candidates:
        if (c / "base").is_dir():
            return c
    raise InputError("the bundled sample_data is missing from this installation; pass BASE RUN ... instead.")


def sample_checkpoints() -> tuple[str, list[str]]:
    root = sample_dir()
    runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(DEFAULT_RUN_PREFIX))
    return str(root / "base"), [str(p) for p in runs]
