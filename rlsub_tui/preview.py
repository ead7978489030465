"""Tensor names straight from safetensors headers, without torch: the explorer draws its tree at once.

Best effort only: anything unusual returns None, and the real loader reports problems precisely.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 256 * 1024 * 1024


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
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > MAX_HEADER_BYTES:
                return None
            header = json.loads(fh.read(size))
        names = [k for k in header if k != "__metadata__"]
        return names if all(isinstance(k, str) for k in names) else None
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
        return None
