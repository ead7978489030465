"""The summary strip: the focused node's answer in a few lines (built by glance.summary_lines)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class SummaryStrip(Static):
    def __init__(self, **kw):
        super().__init__("", **kw)
        self.lines: list[str] = []

    def show(self, lines: list[str]) -> None:
        self.lines = list(lines)
        text = Text(no_wrap=True)
        width = max(8, (self.size.width or 80) - 2)  # less the padding
        for i, line in enumerate(self.lines):
            line = line if len(line) <= width else line[:width - 1] + "…"
            text.append(line, style="bold" if i == 0 else "")
            if i < len(self.lines) - 1:
                text.append("\n")
        self.update(text)
