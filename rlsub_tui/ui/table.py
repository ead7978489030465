"""The table of the selected node's children, one row each, formatted for people and sortable."""

from __future__ import annotations

import math

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from rlsub_tui.explore import Column
from rlsub_tui.formatting import count, pct, ratio, sci


NAME_WIDTH = 24


def short(name: str, width: int = NAME_WIDTH) -> str:
    """Long names keep their start and end (the informative parts): 'post_attention_l…m.weight'."""
    if len(name) <= width:
        return name
    head = (width - 1) * 2 // 3
    return name[:head] + "…" + name[-(width - 1 - head):]


def display(value, kind: str) -> Text:
    if kind == "count":
        return Text(count(value), justify="right")
    if kind == "pct":
        return Text(pct(value), justify="right")
    if kind == "ratio":
        return Text(ratio(value, 3), justify="right")
    if kind == "sci":
        return Text(sci(value), justify="right")
    return Text(short(str(value)))


def sort_value(value):
    if isinstance(value, float) and math.isnan(value):
        return (1, 0.0)
    if isinstance(value, (int, float)):
        return (0, value)
    return (0, str(value))


class ChildrenTable(DataTable):
    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False, id="table.down"),
        Binding("k", "cursor_up", "Up", show=False, id="table.up"),
        Binding("h", "cursor_left", "Left", show=False, id="table.left"),
        Binding("l", "cursor_right", "Right", show=False, id="table.right"),
        Binding("g", "scroll_top", "Top", show=False, id="table.top"),
        Binding("G", "scroll_bottom", "Bottom", show=False, id="table.bottom"),
    ]

    def __init__(self, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.columns_spec: list[Column] = []
        self.rows_data: list[dict] = []
        self.sort_column: str | None = None
        self.sort_reverse = False

    def show(self, columns: list[Column], rows: list[dict]) -> None:
        keep_row = self.cursor_row
        keys = [c.key for c in columns]
        if self.sort_column not in keys:
            self.sort_column = None
        self.clear(columns=True)
        self.columns_spec = columns
        self.rows_data = self._sorted(rows)
        cells = [[display(row[c.key], c.kind) for c in columns] for row in self.rows_data]
        for j, c in enumerate(columns):
            arrow = "" if c.key != self.sort_column else (" ▼" if self.sort_reverse else " ▲")
            title = c.title + arrow
            # widths given, not measured later on idle: a redraw never shows header-wide columns meanwhile
            width = max([len(title)] + [cell_len(str(r[j])) for r in cells])
            self.add_column(title, key=c.key, width=width)
        for i, row in enumerate(cells):
            self.add_row(*row, key=str(i))
        if self.rows_data:
            self.move_cursor(row=min(keep_row, len(self.rows_data) - 1), animate=False)

    def _sorted(self, rows: list[dict]) -> list[dict]:
        if self.sort_column is None:
            return list(rows)
        key = self.sort_column
        return sorted(rows, key=lambda r: sort_value(r.get(key)), reverse=self.sort_reverse)

    def cycle_sort(self) -> str:
        """Sort by the next column: numbers largest first, names A to Z; after the last, back to none."""
        keys = [c.key for c in self.columns_spec]
        if not keys:
            return ""
        i = keys.index(self.sort_column) + 1 if self.sort_column in keys else 0
        if i >= len(keys):
            self.sort_column = None
            return "original order"
        self.sort_column = keys[i]
        self.sort_reverse = self.columns_spec[i].kind != "text"
        return self.sort_column

    def reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse

    def action_scroll_top(self) -> None:
        self.move_cursor(row=0)

    def action_scroll_bottom(self) -> None:
        self.move_cursor(row=max(0, self.row_count - 1))
