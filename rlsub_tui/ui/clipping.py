"""Lines cut off at a pane's right edge end in '…', so a clipped value never reads as a shorter one."""

from __future__ import annotations

from rich.segment import Segment
from textual.strip import Strip

MARK = "…"


def mark_clipped(strip: Strip, visible: int) -> Strip:
    """The strip with its last visible cell (column `visible` - 1) replaced by the mark, in that cell's style;
    what lies beyond (under a scrollbar) is kept, so the strip keeps its length."""
    length = strip.cell_length
    if visible < 1 or length < visible:
        return strip
    segments = list(strip.crop(visible - 1, visible))
    style = segments[-1].style if segments else None
    parts = list(strip.crop(0, visible - 1)) + [Segment(MARK, style)] + list(strip.crop(visible, length))
    return Strip(parts, length)
