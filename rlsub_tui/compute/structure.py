"""Row and column structure of an update: how many rows and columns of a matrix hold an updated parameter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LineCounts:
    """One run's rows and columns of one m×n matrix that hold at least one updated parameter."""

    rows: int
    cols: int


def row_pieces(start: int, length: int, n: int):
    """Flat positions start .. start + length - 1 of a row-major matrix with n columns, in at most three
    pieces (lo, hi, whole): the end of a row begun before (whole 0), `whole` complete rows, the start of a
    row (whole 0); lo and hi are offsets from `start`."""
    head = min((-start) % n, length)
    if head:
        yield 0, head, 0
    whole = (length - head) // n
    if whole:
        yield head, head + whole * n, whole
    tail = head + whole * n
    if tail < length:
        yield tail, length, 0


class LineAccumulator:
    """Rows and columns touched by a flat (row-major) mask, one chunk at a time: add() each chunk, finish()."""

    def __init__(self, shape, device=None):
        self.applies = len(shape) == 2
        self.m, self.n = (int(shape[0]), int(shape[1])) if self.applies else (0, 0)
        self.rows = torch.zeros(self.m, dtype=torch.bool, device=device)
        self.cols = torch.zeros(self.n, dtype=torch.bool, device=device)

    def add(self, mask, start: int) -> None:
        """The mask of flat positions start .. start + mask.numel() - 1."""
        if not self.applies or not self.n:
            return
        for lo, hi, whole in row_pieces(start, mask.numel(), self.n):
            if not whole:
                self._partial(mask[lo:hi], start + lo)
                continue
            block = mask[lo:hi].view(whole, self.n).view(torch.uint8)  # amax on bytes: ~20x any()
            row0 = (start + lo) // self.n
            self.rows[row0:row0 + whole] |= block.amax(dim=1).bool()
            self.cols |= block.amax(dim=0).bool()

    def _partial(self, piece, start: int) -> None:
        """A piece of one row, starting at flat position `start`."""
        row, col = divmod(start, self.n)
        self.rows[row] |= piece.any()
        self.cols[col:col + piece.numel()] |= piece

    def finish(self) -> LineCounts | None:
        if not self.applies:
            return None
        return LineCounts(int(self.rows.sum()), int(self.cols.sum()))


class CodeLines:
    """Rows and columns touched, for every run at once, from a flat (row-major) int64 code per position in
    which run j's field is non-zero where run j updated (the cross-run layout's key, CPU only): one bitwise
    OR along the rows and one down the columns per chunk, whatever K, then each run's field at the end."""

    def __init__(self, shape):
        self.m, self.n = int(shape[0]), int(shape[1])
        self.rows = np.zeros(self.m, dtype=np.int64)
        self.cols = np.zeros(self.n, dtype=np.int64)

    def add(self, codes: np.ndarray, start: int) -> None:
        """The codes of flat positions start .. start + codes.size - 1."""
        if not self.n:
            return
        for lo, hi, whole in row_pieces(start, codes.size, self.n):
            if not whole:
                self._partial(codes[lo:hi], start + lo)
                continue
            block = codes[lo:hi].reshape(whole, self.n)
            row0 = (start + lo) // self.n
            self.rows[row0:row0 + whole] |= np.bitwise_or.reduce(block, axis=1)
            self.cols |= np.bitwise_or.reduce(block, axis=0)

    def _partial(self, piece: np.ndarray, start: int) -> None:
        row, col = divmod(start, self.n)
        self.rows[row] |= np.bitwise_or.reduce(piece)
        self.cols[col:col + piece.size] |= piece

    def finish(self, shift: int, field: int) -> LineCounts:
        """Run j's counts, its field being (code >> shift) & field."""
        return LineCounts(int(np.count_nonzero((self.rows >> shift) & field)),
                          int(np.count_nonzero((self.cols >> shift) & field)))
