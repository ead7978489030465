"""A checkpoint as the analysis sees it: what the user named, its tensors, and reads one tensor at a time.

Nothing outside this module and the readers (readers.py, peft_adapter.py, fsdp_shards.py, dcp_folder.py,
zero_partitions.py) knows about files: the analysis sees `name -> tensor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlsub_tui.checkpoints.dcp_folder import DcpFolder
from rlsub_tui.checkpoints.fsdp_shards import FsdpShards
from rlsub_tui.checkpoints.locate import CheckpointLayout, config_file, fingerprint, locate
from rlsub_tui.checkpoints.readers import (
    SAFETENSORS_DTYPES,
    PickledStateDict,
    Reader,
    SafetensorsFile,
    ShardedSafetensors,
    TensorInfo,
    read_safetensors_header,
)
from rlsub_tui.checkpoints.zero_partitions import ZeroPartitions
from rlsub_tui.util.errors import CheckpointError

__all__ = ["SAFETENSORS_DTYPES", "Checkpoint", "TensorInfo", "open_checkpoint", "read_safetensors_header"]


class Checkpoint:
    """One model checkpoint on disk: its label and files, the tensor directory, and its layout's reader."""

    def __init__(self, source: str, label: str, files: list[Path], layout: CheckpointLayout,
                 base: Checkpoint | None = None):
        self.source = source
        self.label = label
        self.files = files
        self.layout = layout
        self.reader: Reader = open_reader(files, layout, base)
        self.tensors: dict[str, TensorInfo] = self.reader.tensors
        if not self.tensors:
            raise CheckpointError(f"{source}: the checkpoint holds no tensors.")

    def config(self) -> dict | None:
        """The model's config.json beside the weights; None when absent or unreadable (it only refines)."""
        path = config_file(self.files)
        try:
            data = json.loads(path.read_text()) if path else None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def storage_key(self, name: str) -> tuple | None:
        """For a pickled tensor, what identifies its memory (two names with one key are one tensor); else None."""
        return self.reader.storage_key(name)

    def notes(self) -> list[str]:
        """What the user should know about how this checkpoint is read (a LoRA adapter's rank bound, ...)."""
        return self.reader.notes(self.label)

    def not_read(self) -> dict[str, str]:
        """Entries of the files that are not read as model tensors (a DCP folder's optimizer state ...), with why."""
        return self.reader.not_read()

    def fingerprint(self) -> str:
        """Identity of the checkpoint's bytes for caching (see locate.fingerprint)."""
        return fingerprint(self.files)

    def read_shape(self, name: str, rows: int | None = None) -> tuple[tuple[int, ...], int]:
        """Shape and byte length of a tensor as read (only its first `rows` rows when given)."""
        return self.reader.read_shape(name, rows)

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Read one tensor (optionally only its first `rows` rows) into CPU memory."""
        return self.reader.read(name, rows)

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        """Fill the uint8 CPU tensor `out` with the tensor's bytes [start, start + len(out)) (pinned staging)."""
        self.reader.read_bytes(name, out, start)

    def close(self) -> None:
        self.reader.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def open_reader(files: list[Path], layout: CheckpointLayout, base: Checkpoint | None = None) -> Reader:
    """The reader for a located checkpoint's files and layout; `base` is what an adapter's updates are added to.
    (Here, not in readers.py: the layouts' readers import the Reader interface from there.)"""
    if layout == "peft":
        from rlsub_tui.checkpoints.peft_adapter import PeftAdapter

        return PeftAdapter(files, base)
    if layout == "fsdp":
        return FsdpShards(files)
    if layout == "dcp":
        return DcpFolder(files)
    if layout == "zero":
        return ZeroPartitions(files)
    if layout != "safetensors":
        return PickledStateDict(files)
    return SafetensorsFile(files[0]) if len(files) == 1 else ShardedSafetensors(files)


def open_checkpoint(source: str, label: str | None = None, base: Checkpoint | None = None) -> Checkpoint:
    """Open what the user named: a model directory, one weights file, or a model id in the local HF cache. A run
    that holds only an adapter (PEFT) is read as `base` plus its update, so it needs the base."""
    found = locate(source)
    if found.layout == "peft" and base is None:
        raise CheckpointError(f"{source}: is a PEFT adapter; it can only be read as a run, against a base.")
    return Checkpoint(source, label or found.path.name, found.files, found.layout, base)
