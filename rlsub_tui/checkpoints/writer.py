"""Writing safetensors files one tensor at a time (header first, then data), into a temp file renamed at the end."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsub_tui.checkpoints.checkpoint import SAFETENSORS_DTYPES

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a file being written: its name, dtype and shape, known before any data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsWriter:
    """Writes the header for `entries` at once, then each tensor's bytes in the given order.

    A file written this way is a plain safetensors file (`safetensors.torch.load_file` reads it);
    memory never holds more than the tensor being written.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None,
                 reserve: int = 0):
        """`reserve` extra header bytes (spaces) let `rewrite_metadata` fill in figures known only at the end."""
        self.path = Path(path)
        self._entries = entries
        raw = self._header(metadata)
        size = len(raw) + reserve
        self._header_len = size + (-size % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._pending = list(reversed(entries))
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", self._header_len) + raw.ljust(self._header_len, b" "))

    def _header(self, metadata: dict[str, str] | None) -> bytes:
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for e in self._entries:
            header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        return json.dumps(header, separators=(",", ":")).encode("utf-8")

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        """Replace the metadata in place; it must fit in the header written at the start (see `reserve`)."""
        raw = self._header(metadata)
        if len(raw) > self._header_len:
            raise ValueError(f"{self.path}: metadata of {len(raw)} bytes does not fit the reserved header")
        here = self._fh.tell()
        self._fh.seek(8)
        self._fh.write(raw.ljust(self._header_len, b" "))
        self._fh.seek(here)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._pending.pop()
        if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise ValueError(f"{self.path}: expected {expected}, got '{name}' {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors were never written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()
