"""Tensor names straight from safetensors headers, without torch: the explorer draws its tree at once.

Best effort only: anything unusual returns None, and the real loader reports problems precisely.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlsub_tui.checkpoints.safetensors_header import read_header
from rlsub_tui.util.errors import CheckpointError


def tensor_names(source: str) -> list[str] | None:
    try:
        path = Path(source).expanduser()
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                return list(json.loads(index.read_text())["weight_map"])
            candidates = [path / "model.safetensors"] if (path / "model.safetensors").is_file() \
                else sorted(path.glob("*.safetensors"))
            if len(candidates) != 1:
                return None
            path = candidates[0]
        if path.suffix != ".safetensors" or not path.is_file():
            return None
        return list(read_header(path))
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
