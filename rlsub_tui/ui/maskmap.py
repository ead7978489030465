"""The mask map: one tensor drawn as a grid of blocks, each shaded by the fraction of its parameters updated."""

from __future__ import annotations

import math

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.widgets import Static

RAMP = [(0.0, (20, 20, 30)), (0.5, (30, 110, 160)), (1.0, (250, 230, 90))]  # 0% dark, 100% bright yellow


def shade(fraction: float) -> Style:
    if math.isnan(fraction):
        return Style(bgcolor="black")
    f = min(max(fraction, 0.0), 1.0)
    for (f0, c0), (f1, c1) in zip(RAMP, RAMP[1:]):
        if f <= f1:
            t = (f - f0) / (f1 - f0)
            rgb = tuple(int(a + (b - a) * t) for a, b in zip(c0, c1))
            return Style(bgcolor=Color.from_rgb(*rgb))
    return Style(bgcolor=Color.from_rgb(*RAMP[-1][1]))


class MaskMapPanel(Static):
    def __init__(self, **kw):
        super().__init__("", **kw)
        self.fraction: np.ndarray | None = None
        self.title = ""

    def map_size(self) -> tuple[int, int]:
        """Cells the map can use: the panel less a title and a legend line."""
        return max(2, (self.size.height or 12) - 2), max(4, (self.size.width or 48) - 2)

    def show_message(self, title: str, message: str) -> None:
        self.fraction, self.title = None, title
        self.update(Text(f"{title}\n{message}"))

    def show(self, title: str, fraction: np.ndarray) -> None:
        self.fraction, self.title = fraction, title
        width = self.map_size()[1]
        text = Text(no_wrap=True)
        text.append((title if len(title) <= width else title[:width - 1] + "…") + "\n", style="bold")
        for row in fraction:
            for f in row:
                text.append(" ", style=shade(float(f)))
            text.append("\n")
        text.append("updated: 0% ")
        for f in np.linspace(0, 1, 11):
            text.append(" ", style=shade(float(f)))
        text.append(" 100%")
        self.update(text)
