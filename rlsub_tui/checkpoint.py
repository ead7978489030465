"""Checkpoint layouts: find a model's tensors from headers and read them one at a time.

Nothing outside this module knows about files: the analysis sees `name -> tensor`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsub_tui.errors import CheckpointError
from rlsub_tui.locate import MAX_HEADER_BYTES, CheckpointLayout, config_file, fingerprint, locate

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


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; raise CheckpointError on anything malformed."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header size).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{file}: header size {header_len} is larger than the file ({size} bytes); "
                    "the file is truncated or not a safetensors file."
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: header size {header_len} bytes is implausibly large.")
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc}).") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object.")
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"{file}: tensor '{name}' has a malformed header entry.")
        dtype_name = entry.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unknown dtype {dtype_name!r}.")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{file}: tensor '{name}' has an invalid shape {shape!r}.")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise CheckpointError(f"{file}: tensor '{name}' has invalid data_offsets {offsets!r}.")
        begin, end = offsets
        dtype = SAFETENSORS_DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        if begin < 0 or end < begin or end > data_size:
            raise CheckpointError(
                f"{file}: tensor '{name}' data_offsets [{begin}, {end}] fall outside the "
                f"{data_size} bytes of data; the file is truncated or corrupt."
            )
        if end - begin != numel * _element_size(dtype):
            raise CheckpointError(
                f"{file}: tensor '{name}' occupies {end - begin} bytes but shape {shape} of "
                f"{dtype_name} needs {numel * _element_size(dtype)}."
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, dtype, tuple(shape), file, data_start + begin, end - begin)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1 and e0 > b0:
            raise CheckpointError(f"{file}: tensors '{n0}' and '{n1}' overlap in the data section.")
    return infos


class Checkpoint:
    """One model checkpoint on disk: the tensor directory from headers, and reads one tensor at a time."""

    def __init__(self, source: str, label: str, files: list[Path], layout: CheckpointLayout):
        self.source = source
        self.label = label
        self.files = files
        self.layout = layout
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._fds: dict[Path, int] = {}
        if layout == "safetensors":
            for file in files:
                for name, info in read_safetensors_header(file).items():
                    if name in self.tensors:
                        raise CheckpointError(f"{file}: tensor '{name}' also appears in {self.tensors[name].file}.")
                    self.tensors[name] = info
        else:
            for file in files:
                state = _load_pickle(file)
                self._pickled[file] = state
                for pos, (name, t) in enumerate(state.items()):
                    if name in self.tensors:
                        raise CheckpointError(f"{file}: tensor '{name}' also appears in {self.tensors[name].file}.")
                    nbytes = t.numel() * t.element_size()
                    self.tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), file, pos, nbytes)
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
        info = self.tensors[name]
        if self.layout == "safetensors":
            return None
        t = self._pickled[info.file][name]
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def fingerprint(self) -> str:
        """Identity of the checkpoint's bytes for caching (see locate.fingerprint)."""
        return fingerprint(self.files)

    def read_shape(self, name: str, rows: int | None = None) -> tuple[tuple[int, ...], int]:
        """Shape and byte length of a tensor as read (only its first `rows` rows when given)."""
        info = self.tensors[name]
        if rows is None or not info.shape:
            return info.shape, info.nbytes
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return (rows,) + info.shape[1:], row_bytes * rows

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Read one tensor (optionally only its first `rows` rows) into CPU memory."""
        info = self.tensors[name]
        if self.layout != "safetensors":
            t = self._pickled[info.file][name]
            t = t[:rows] if rows is not None else t
            return t.contiguous().clone()
        shape, nbytes = self.read_shape(name, rows)
        # torch.empty does not touch the memory (a bytearray would zero it while holding the GIL,
        # stalling the UI thread for a large tensor); reads go straight into it.
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.read_bytes(name, buf, 0)
        return buf.view(info.dtype).reshape(shape)

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        """Fill the uint8 CPU tensor `out` with the tensor's bytes [start, start + len(out)) (pinned staging)."""
        info = self.tensors[name]
        if self.layout != "safetensors":
            src = self._pickled[info.file][name].contiguous().reshape(-1).view(torch.uint8)
            out.copy_(src[start:start + out.numel()])
            return
        view = memoryview(out.numpy())
        fd = self._fd(info.file)
        done, nbytes = 0, out.numel()
        while done < nbytes:  # one read returns at most ~2 GB on Linux
            try:
                got = os.preadv(fd, [view[done:]], info.offset + start + done)
            except OSError as exc:
                raise CheckpointError(f"{info.file}: reading tensor '{name}' failed ({exc.strerror or exc}).") from None
            if got <= 0:
                raise CheckpointError(f"{info.file}: tensor '{name}' is cut short; the file is truncated.")
            done += got

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot be opened ({exc.strerror or exc}).") from None
            self._fds[file] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch pickle with weights_only=True: a pickle that would run code is refused."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise CheckpointError(
            f"{file}: refused to load: this pickle holds more than plain tensors and would run code "
            f"if unpickled (loaded with weights_only=True: {first})"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{file}: cannot be read as a PyTorch checkpoint ({_short(exc)}).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: is not a state dict of named tensors.")
    return state


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def open_checkpoint(source: str, label: str | None = None) -> Checkpoint:
    """Open what the user named: a model directory, one weights file, or a model id in the local HF cache."""
    found = locate(source)
    return Checkpoint(source, label or found.path.name, found.files, found.layout)
