"""The pages of a memory-mapped checkpoint file given back once a tensor has been read out of them.

A page of a mapped file that has been read stays in the process's resident set until it is unmapped: reading every
tensor of a memory-mapped rank file (torch.load's mmap=True) would leave the whole file resident, so that the
analysis of a trainer's checkpoint would grow with the model. After each copy the reader advises the kernel that
the pages are not needed (MADV_DONTNEED): they leave the resident set and stay in the page cache, and a later read
faults them in again from the file, unchanged (the mapping is never written).

Only memory that lies inside a mapping of the file is ever advised: the mapped ranges are taken from
/proc/self/maps right after the file is loaded, and a tensor outside them (a bare pickle, loaded into ordinary
memory) is left alone. Where there is no /proc or no madvise this does nothing."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_PAGE = mmap.PAGESIZE


def _madvise():
    if _DONTNEED is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def file_ranges(file: Path) -> list[tuple[int, int]]:
    """The address ranges [start, end) at which `file` is mapped in this process now."""
    want = os.path.realpath(file)
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == want:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


class MappedPages:
    """Where one loaded file is mapped; `release` gives back the whole pages under a tensor read from it."""

    def __init__(self, file: Path):
        self.file = file
        self.ranges = file_ranges(file) if _MADVISE is not None else []

    def release(self, t: torch.Tensor) -> None:
        if not self.ranges or t.numel() == 0:
            return
        start = t.data_ptr()
        span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        end = start + span * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return
        first = -(-start // _PAGE) * _PAGE  # whole pages only: a page shared with a neighbour stays
        last = end // _PAGE * _PAGE
        if last > first:
            _MADVISE(first, last - first, _DONTNEED)
