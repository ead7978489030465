"""The one safetensors header reader: size, JSON and every tensor's entry, checked, without torch."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rlsub_tui.util.errors import CheckpointError

# A header larger than this is not a real safetensors header (real ones are a few MB).
MAX_HEADER_BYTES = 256 * 1024 * 1024

# Bytes per element of each safetensors dtype name.
DTYPE_SIZES: dict[str, int] = {
    "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
    "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1,
}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as its file's header describes it: dtype name, shape and absolute byte span."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def header_prefix(fh: BinaryIO) -> bytes:
    """The size field and the header's bytes as they stand, unchecked (at most MAX_HEADER_BYTES of them)."""
    head = fh.read(8)
    if len(head) < 8:
        return head
    (header_len,) = struct.unpack("<Q", head)
    return head + fh.read(min(header_len, MAX_HEADER_BYTES))


def read_raw_header(file: Path) -> tuple[bytes, int]:
    """The header's bytes and the file's size; CheckpointError when the size field is impossible."""
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
            return fh.read(header_len), size
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc}).") from None


def parse_header_json(file: Path, raw: bytes) -> dict:
    """The header as a JSON object."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object.")
    return header


def _fields(file: Path, name: str, entry) -> tuple[str, list[int], list[int]]:
    """dtype, shape and data_offsets of one entry, each of the right type."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{file}: tensor '{name}' has a malformed header entry.")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{file}: tensor '{name}' has unknown dtype {dtype!r}.")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{file}: tensor '{name}' has an invalid shape {shape!r}.")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise CheckpointError(f"{file}: tensor '{name}' has invalid data_offsets {offsets!r}.")
    return dtype, shape, offsets


def parse_entry(file: Path, name: str, entry, data_start: int, data_size: int) -> HeaderEntry:
    """One tensor's entry, checked: a known dtype, a shape, offsets inside the data that fit the shape."""
    dtype, shape, (begin, end) = _fields(file, name, entry)
    if begin < 0 or end < begin or end > data_size:
        raise CheckpointError(
            f"{file}: tensor '{name}' data_offsets [{begin}, {end}] fall outside the "
            f"{data_size} bytes of data; the file is truncated or corrupt."
        )
    needed = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != needed:
        raise CheckpointError(
            f"{file}: tensor '{name}' occupies {end - begin} bytes but shape {shape} of {dtype} needs {needed}."
        )
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, end - begin)


def check_overlaps(file: Path, entries: list[HeaderEntry]) -> None:
    """No two tensors' non-empty byte spans may overlap."""
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1 and e0 > b0:
            raise CheckpointError(f"{file}: tensors '{n0}' and '{n1}' overlap in the data section.")


def read_header(file: Path) -> dict[str, HeaderEntry]:
    """Parse and validate a safetensors header; raise CheckpointError on anything malformed."""
    raw, size = read_raw_header(file)
    header = parse_header_json(file, raw)
    data_start = 8 + len(raw)
    entries = [parse_entry(file, name, entry, data_start, size - data_start)
               for name, entry in header.items() if name != "__metadata__"]
    check_overlaps(file, entries)
    return {e.name: e for e in entries}
