"""The K×K overlap heatmap: runs × runs, each cell the chosen measure, its background coloured by lift."""

from __future__ import annotations

import math

from rich.console import Group
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from rlsub_tui.summaries.strip import LIFT_MEASURES, MEASURE_TITLES, GridCell
from rlsub_tui.ui.maskmap import shade


def lift_range(grid: list[list[GridCell]], measure: str = "o1") -> tuple[float, float]:
    lifts = [c.colour_lift(measure) for row in grid for c in row if not math.isnan(c.colour_lift(measure))]
    return (min(lifts), max(lifts)) if lifts else (math.nan, math.nan)


def lift_style(lift: float, lo: float, hi: float) -> Style:
    """Colour on this grid's own range of lifts (dark: the lowest, bright: the highest), so that small
    differences between pairs show; the legend prints the range."""
    if math.isnan(lift):
        return Style()
    t = 0.5 if hi - lo < 1e-12 else (lift - lo) / (hi - lo)
    bg = shade(t).bgcolor
    return Style(bgcolor=bg, color="black" if t > 0.6 else "white", bold=True)


def cell_text(c: GridCell, measure: str, lo: float, hi: float) -> Text:
    if math.isnan(c.value):
        return Text("·" if math.isnan(c.lift) and math.isnan(c.chance) else "–", justify="center")
    if measure in LIFT_MEASURES:
        shown = f"{c.value:.2f}" if c.value < 10 else f"{c.value:.1f}" if c.value < 100 else f"{c.value:.0f}"
    else:
        shown = f"{c.value:.3f}".lstrip("0") if c.value < 1 else f"{c.value:.2f}"
    return Text(shown, style=lift_style(c.colour_lift(measure), lo, hi), justify="right")


def legend(lo: float, hi: float, measure: str = "o1") -> Text:
    """The colour scale's ends, both in the lifts' own format (2 decimals)."""
    text = Text("colour: stratified lift " if measure == "lift_strat" else "colour: pooled lift ")
    text.append(f"{_lift_number(lo)} ")
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        text.append(" ", style=shade(t))
    text.append(f" {_lift_number(hi)}")
    return text


def _lift_number(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:.0f}×"


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
        title = f"{MEASURE_TITLES[measure]} (o" + (", b)" if what == "groups" else ")")
        width = max(20, (self.size.width or 48) - 2)
        title = title if len(title) <= width else title[:width - 1] + "…"
        if message:
            self.update(Text(f"{title}\n{message}"))
            return
        name_width = max(8, min(24, (self.size.width or 48) - 6 * len(names) - 2))
        lo, hi = lift_range(grid, measure)
        table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False)
        table.add_column(what[:-1], no_wrap=True, width=name_width)
        for key in keys:
            table.add_column(str(key), justify="right", width=5, no_wrap=True)
        for key, name, cells in zip(keys, names, grid):
            table.add_row(name_cell(key, name, name_width), *(cell_text(c, measure, lo, hi) for c in cells))
        self.update(Group(Text(title, style="italic", no_wrap=True), table, legend(lo, hi, measure)))
