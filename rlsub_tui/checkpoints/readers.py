"""One reader per checkpoint layout (one safetensors file, sharded safetensors, pickled state dicts), one interface.

The directory of tensors (`tensors`, from headers or the state dicts) is kept apart from reading
(`read`, `read_bytes`), as mergekit keeps its shard index apart from its loaders.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsub_tui.checkpoints.mapped_pages import MappedPages
from rlsub_tui.checkpoints.restricted_pickle import load_restricted
from rlsub_tui.checkpoints.safetensors_header import read_header
from rlsub_tui.util.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from the header alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file` (safetensors) or position in the state dict (pickle)
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header (safetensors_header.read_header) into TensorInfo."""
    return {name: TensorInfo(name, SAFETENSORS_DTYPES[e.dtype], e.shape, file, e.offset, e.nbytes)
            for name, e in read_header(file).items()}


class Reader:
    """What every layout offers: the tensors' directory and reads of one tensor (or its first rows) at a time."""

    tensors: dict[str, TensorInfo]

    def read_shape(self, name: str, rows: int | None = None) -> tuple[tuple[int, ...], int]:
        """Shape and byte length of a tensor as read (only its first `rows` rows when given)."""
        info = self.tensors[name]
        if rows is None or not info.shape:
            return info.shape, info.nbytes
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return (rows,) + info.shape[1:], row_bytes * rows

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Read one tensor (optionally only its first `rows` rows) into CPU memory."""
        raise NotImplementedError

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        """Fill the uint8 CPU tensor `out` with the tensor's bytes [start, start + len(out)) (pinned staging)."""
        raise NotImplementedError

    def storage_key(self, name: str) -> tuple | None:
        """What identifies a tensor's memory (two names with one key are one tensor); None when files can't share."""
        return None

    def notes(self, label: str) -> list[str]:
        """Sentences on how this checkpoint is read that the user should see, naming it by `label` (none here)."""
        return []

    def not_read(self) -> dict[str, str]:
        """Entries the files hold that are not read as model tensors (training state, pickled bytes), each with why."""
        return {}

    def close(self) -> None:
        """Release open files."""


def _add(tensors: dict[str, TensorInfo], file: Path, found: dict[str, TensorInfo]) -> None:
    """Join one file's tensors to the directory; a name in two files is an error."""
    for name, info in found.items():
        if name in tensors:
            raise CheckpointError(f"{file}: tensor '{name}' also appears in {tensors[name].file}.")
        tensors[name] = info


class SafetensorsFile(Reader):
    """One .safetensors file: its header is the directory; reads go straight from the file into a tensor."""

    def __init__(self, file: Path):
        self.file = file
        self.tensors = read_safetensors_header(file)
        self._fd: int | None = None

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        shape, nbytes = self.read_shape(name, rows)
        # torch.empty does not touch the memory (a bytearray would zero it while holding the GIL,
        # stalling the UI thread for a large tensor); reads go straight into it.
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.read_bytes(name, buf, 0)
        return buf.view(self.tensors[name].dtype).reshape(shape)

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        info = self.tensors[name]
        view = memoryview(out.numpy())
        fd = self._open()
        done, nbytes = 0, out.numel()
        while done < nbytes:  # one read returns at most ~2 GB on Linux
            try:
                got = os.preadv(fd, [view[done:]], info.offset + start + done)
            except OSError as exc:
                raise CheckpointError(f"{info.file}: reading tensor '{name}' failed ({exc.strerror or exc}).") from None
            if got <= 0:
                raise CheckpointError(f"{info.file}: tensor '{name}' is cut short; the file is truncated.")
            done += got

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{self.file}: cannot be opened ({exc.strerror or exc}).") from None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShardedSafetensors(Reader):
    """Safetensors shards: a name -> shard index over one SafetensorsFile per shard."""

    def __init__(self, files: list[Path]):
        self.shards: list[SafetensorsFile] = []
        self.tensors: dict[str, TensorInfo] = {}
        self._shard_of: dict[str, SafetensorsFile] = {}
        for file in files:
            shard = SafetensorsFile(file)
            self.shards.append(shard)
            _add(self.tensors, file, shard.tensors)
            self._shard_of.update(dict.fromkeys(shard.tensors, shard))

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        return self._shard_of[name].read(name, rows)

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        self._shard_of[name].read_bytes(name, out, start)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


class PickledStateDict(Reader):
    """PyTorch pickles (`.bin`, `.pt`, one or sharded), loaded with weights_only=True and memory-mapped."""

    def __init__(self, files: list[Path]):
        self.tensors: dict[str, TensorInfo] = {}
        self._state: dict[str, torch.Tensor] = {}
        self._pages: dict[str, MappedPages] = {}
        for file in files:
            state = load_pickle(file)
            pages = MappedPages(file)
            self._pages.update(dict.fromkeys(state, pages))
            found = {name: TensorInfo(name, t.dtype, tuple(t.shape), file, pos, t.numel() * t.element_size())
                     for pos, (name, t) in enumerate(state.items())}
            _add(self.tensors, file, found)
            self._state.update(state)

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        t = self._state[name]
        t = t[:rows] if rows is not None else t
        out = t.contiguous().clone()
        self._pages[name].release(t)
        return out

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        src = self._state[name].contiguous().reshape(-1).view(torch.uint8)[start:start + out.numel()]
        out.copy_(src)
        self._pages[name].release(src)

    def storage_key(self, name: str) -> tuple | None:
        t = self._state[name]
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch pickle with weights_only=True and nothing else allowed: a pickle that would run code is refused."""
    state = load_restricted(file, [], "not a plain tensor and would run code if unpickled")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: is not a state dict of named tensors.")
    return state

