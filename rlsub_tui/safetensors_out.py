"""Writing safetensors files one tensor at a time (header first, then data), into a temp file renamed at the end."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from rlsub_tui.checkpoint import SAFETENSORS_DTYPES

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


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path next to `path`, renamed onto it when the block succeeds and removed when it fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file should look like any other
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directories(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary directories next to each of `paths`, moved into place (replacing what is there) on success.

    On failure every temporary directory is removed and the targets are left as they were.
    """
    temps = []
    try:
        for p in paths:
            temps.append(Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)))
            os.chmod(temps[-1], 0o777 & ~_umask())
        yield temps
        for tmp, target in zip(temps, paths):
            _replace_directory(tmp, target)
    except BaseException:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_directory(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "previous")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
