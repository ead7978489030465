"""The K×K overlap heatmap: runs × runs, each cell the chosen measure, its background coloured by lift."""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from rlsub_tui.glance import MEASURE_TITLES, GridCell

# lift over chance -> background: below chance red, then darker to brighter green
LIFT_STEPS = [(1.0, "#870000"), (1.5, "#5f5f00"), (3.0, "#005f00"), (10.0, "#008700"), (math.inf, "#00af00")]
LEGEND = "colour = lift: <1 <1.5 <3 <10 ≥10"


def lift_colour(lift: float) -> str:
    if math.isnan(lift):
        return ""
    return next(colour for bound, colour in LIFT_STEPS if lift < bound)


def cell_text(c: GridCell, measure: str) -> Text:
    if math.isnan(c.value):
        return Text("·" if math.isnan(c.lift) and math.isnan(c.chance) else "–", justify="center")
    shown = f"{c.value:.1f}" if measure == "lift" and c.value < 100 else f"{c.value:.0f}" if measure == "lift" \
        else f"{c.value:.3f}".lstrip("0") if c.value < 1 else f"{c.value:.2f}"
    return Text(shown, style=f"bold white on {lift_colour(c.lift)}" if lift_colour(c.lift) else "", justify="right")


def name_cell(key: int, label: str, width: int) -> Text:
    text = f"{key} {label}"
    return Text(text if len(text) <= width else text[:width - 1] + "…", no_wrap=True)


class HeatmapPanel(Static):
    def __init__(self, **kw):
        super().__init__("", **kw)
        self.grid: list[list[GridCell]] = []
        self.measure = "o1"
        self.names: list[str] = []

    def show(self, grid: list[list[GridCell]], names: list[str], keys: list[int], measure: str,
             message: str | None = None, what: str = "runs") -> None:
        """names: the rows' (and columns') labels in grid order; keys: their numbers (runs keep theirs)."""
        self.grid, self.measure, self.names = grid, measure, names
        title = f"{MEASURE_TITLES[measure]} (o: next" + (", b: runs)" if what == "groups" else ")")
        if message:
            self.update(Text(f"{title}\n{message}"))
            return
        name_width = max(8, min(24, (self.size.width or 48) - 6 * len(names) - 2))
        table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, title=title, title_justify="left",
                      caption=LEGEND, caption_justify="left")
        table.add_column(what[:-1], no_wrap=True, width=name_width)
        for key in keys:
            table.add_column(str(key), justify="right", width=5, no_wrap=True)
        for key, name, cells in zip(keys, names, grid):
            table.add_row(name_cell(key, name, name_width), *(cell_text(c, measure) for c in cells))
        self.update(table)
