"""The table of the selected node's children, one row each, formatted for people and sortable."""

from __future__ import annotations

import math

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding
from textual.strip import Strip
from textual.widgets import DataTable

from rlsub_tui.records.measures import Column
from rlsub_tui.ui.clipping import mark_clipped
from rlsub_tui.util.formatting import count, pct, ratio, sci

NAME_WIDTH = 24  # the widest a name column gets
MIN_NAME_WIDTH = 12


def short(name: str, width: int = NAME_WIDTH) -> str:
    """Long names keep their end (the informative part, the leaf): '…embed_tokens.weight'."""
    if len(name) <= width:
        return name
    return "…" + name[-(width - 1):]


def name_width(table_width: int) -> int:
    """5/12 of the table for names, within [MIN_NAME_WIDTH, NAME_WIDTH]: numbers keep the rest."""
    return max(MIN_NAME_WIDTH, min(NAME_WIDTH, table_width * 5 // 12))


def display(value, kind: str, width: int = NAME_WIDTH) -> Text:
    if kind == "count":
        return Text(count(value), justify="right")
    if kind == "pct":
        return Text(pct(value), justify="right")
    if kind == "ratio":
        return Text(ratio(value, 3), justify="right")
    if kind == "sci":
        return Text(sci(value), justify="right")
    return Text(short(str(value), width))


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
        Binding("h", "cursor_left", "Left", show=False, id="table.left",
                tooltip="Scroll the columns left (the row stays selected)"),
        Binding("l", "cursor_right", "Right", show=False, id="table.right",
                tooltip="Scroll to the columns past the right edge"),
        Binding("enter", "select_cursor", "Open row", show=False, id="table.open",
                tooltip="Open the row's part of the model in the tree: its own children fill the table"),
        Binding("g", "scroll_top", "Top", show=False, id="table.top"),
        Binding("G", "scroll_bottom", "Bottom", show=False, id="table.bottom"),
    ]

    def __init__(self, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.columns_spec: list[Column] = []
        self.rows_data: list[dict] = []  # the rows as shown (sorted)
        self.rows_given: list[dict] = []  # as given: "no sort" shows them in this order
        self.sort_column: str | None = None
        self.sort_reverse = False

    def show(self, columns: list[Column], rows: list[dict]) -> None:
        keep_row = self.cursor_row
        keys = [c.key for c in columns]
        if self.sort_column not in keys:
            self.sort_column = None
        self.clear(columns=True)
        self.columns_spec = columns
        self.rows_given = list(rows)
        self.rows_data = self._sorted(rows)
        width = name_width(self.scrollable_content_region.width)
        cells = [[display(row[c.key], c.kind, width) for c in columns] for row in self.rows_data]
        for j, c in enumerate(columns):
            title = c.title + ("" if c.key != self.sort_column else (" ▼" if self.sort_reverse else " ▲"))
            # widths fixed from the cells now: DataTable measures new rows only when idle, and a frame
            # drawn before that would be cached with the titles' widths (cut values, until the cursor moved)
            self.add_column(title, key=c.key, width=max([cell_len(title)] + [row[j].cell_len for row in cells]))
        for i, row in enumerate(cells):
            self.add_row(*row, key=str(i))
        if self.rows_data:
            self.move_cursor(row=min(keep_row, len(self.rows_data) - 1), animate=False)

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        visible = self.scrollable_content_region.width
        header = 1 if self.show_header else 0
        has_text = y < header or y - header + self.scroll_offset.y < self.row_count  # not blank below the rows
        if has_text and self.virtual_size.width > self.scroll_x + visible:
            return mark_clipped(strip, visible)
        return strip

    def given_index(self, row: int) -> int | None:
        """Where the row shown at `row` (sorted) was in the rows as given, None when there is no such row."""
        if not 0 <= row < len(self.rows_data):
            return None
        shown = self.rows_data[row]
        return next((i for i, r in enumerate(self.rows_given) if r is shown), None)

    def redraw(self) -> None:
        """Show the same rows again, in the current sort order."""
        self.show(self.columns_spec, self.rows_given)

    def _sorted(self, rows: list[dict]) -> list[dict]:
        if self.sort_column is None:
            return list(rows)
        key = self.sort_column
        return sorted(rows, key=lambda r: sort_value(r.get(key)), reverse=self.sort_reverse)

    def cycle_sort(self) -> None:
        """Sort by the next column: numbers largest first, names A to Z; after the last, back to none."""
        keys = [c.key for c in self.columns_spec]
        if not keys:
            return
        i = keys.index(self.sort_column) + 1 if self.sort_column in keys else 0
        if i >= len(keys):
            self.sort_column = None
            return
        self.sort_column = keys[i]
        self.sort_reverse = self.columns_spec[i].kind != "text"

    def reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse

    def action_scroll_top(self) -> None:
        self.move_cursor(row=0)

    def action_scroll_bottom(self) -> None:
        self.move_cursor(row=max(0, self.row_count - 1))
