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


class LineAccumulator:
    """Rows and columns touched by a flat (row-major) mask, one chunk at a time: add() each chunk, finish()."""

    def __init__(self, shape, device=None):
        self.applies = len(shape) == 2
        self.m, self.n = (int(shape[0]), int(shape[1])) if self.applies else (0, 0)
        self.rows = torch.zeros(self.m, dtype=torch.bool, device=device)
        self.cols = torch.zeros(self.n, dtype=torch.bool, device=device)

    def add(self, mask, start: int) -> None:
        """The mask of flat positions start .. start + mask.numel() - 1."""
        if not self.applies or not self.n or not mask.numel():
            return
        n, length = self.n, mask.numel()
        head = min((-start) % n, length)  # the end of a row begun in an earlier chunk
        if head:
            self._partial(mask[:head], start)
        whole = (length - head) // n
        if whole:
            block = mask[head:head + whole * n].view(whole, n).view(torch.uint8)  # amax on bytes: ~20x any()
            row0 = (start + head) // n
            self.rows[row0:row0 + whole] |= block.amax(dim=1).bool()
            self.cols |= block.amax(dim=0).bool()
        tail = head + whole * n
        if tail < length:
            self._partial(mask[tail:], start + tail)

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
        n, length = self.n, codes.size
        if not n or not length:
            return
        head = min((-start) % n, length)  # the end of a row begun in an earlier chunk
        if head:
            self._partial(codes[:head], start)
        whole = (length - head) // n
        if whole:
            block = codes[head:head + whole * n].reshape(whole, n)
            row0 = (start + head) // n
            self.rows[row0:row0 + whole] |= np.bitwise_or.reduce(block, axis=1)
            self.cols |= np.bitwise_or.reduce(block, axis=0)
        tail = head + whole * n
        if tail < length:
            self._partial(codes[tail:], start + tail)

    def _partial(self, piece: np.ndarray, start: int) -> None:
        row, col = divmod(start, self.n)
        self.rows[row] |= np.bitwise_or.reduce(piece)
        self.cols[col:col + piece.size] |= piece

    def finish(self, shift: int, field: int) -> LineCounts:
        """Run j's counts, its field being (code >> shift) & field."""
        return LineCounts(int(np.count_nonzero((self.rows >> shift) & field)),
                          int(np.count_nonzero((self.cols >> shift) & field)))
