"""The chart panel: draws a ChartData (built in the core) with textual-plotext."""

from __future__ import annotations

import os
import textwrap
from typing import NamedTuple

from rich.text import Text
from textual.widgets import Static
from textual_plotext import PlotextPlot

from rlsub_tui.summaries.charts import ChartData

# Series colours (RGB, so the plot and its key line match exactly); no red: red marks the focus and the tolerance
PALETTE = [(0, 175, 255), (255, 135, 255), (135, 215, 0), (255, 215, 0), (175, 135, 255), (0, 215, 175),
           (255, 175, 95), (200, 200, 200), (95, 95, 255), (215, 255, 135), (135, 175, 175), (255, 255, 175)]
SWATCH = "━━"


class KeyEntry(NamedTuple):
    """One series in the key line."""

    label: str
    color: tuple[int, int, int]
    run: int | None = None  # its run's number, when the series is one run's
    kind: str = ""  # what of that run it shows, when a run has several series ('vs base', 'step', 'union')


def key_entries(labels: list[str], run_labels: list[str]) -> list[KeyEntry]:
    """Each series' key entry: a run's own series, or one of a run's several ('<run label> <kind>')."""
    numbers = {label: i + 1 for i, label in enumerate(run_labels)}
    entries = []
    for i, label in enumerate(labels):
        run = numbers.get(label)
        owner = max((r for r in numbers if label.startswith(r + " ")), key=len, default=None) if run is None else None
        entries.append(KeyEntry(label, series_color(i), numbers[owner], label[len(owner) + 1:]) if owner
                       else KeyEntry(label, series_color(i), run))
    return entries


def series_color(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def swatch_style(color: tuple[int, int, int]) -> str:
    return f"rgb({color[0]},{color[1]},{color[2]})"


def key_line(entries: list[KeyEntry], width: int) -> Text:
    """The chart's legend in one line: every series by name when the names fit, else runs by number
    (numbered as in the summary strip, r and the help), several series of each run grouped under its
    number, else each name cut to its share of the width."""
    entries = [KeyEntry(*e) for e in entries]

    def render(names: list[str], suffix: str = "", gap: str = " ", sep: str = "  ") -> Text:
        text = Text()
        for color, name in zip((e.color for e in entries), names):
            text.append(SWATCH, style=swatch_style(color))
            text.append(f"{gap}{name}{sep}")
        text.append(suffix, style="dim")
        text.rstrip()
        return text

    full = render([e.label for e in entries])
    if full.cell_len <= width or not entries:
        return full
    tight = render([e.label for e in entries], sep=" ")
    if tight.cell_len <= width:
        return tight
    if all(e.run is not None and not e.kind for e in entries):
        numbers = [str(e.run) for e in entries]
        numbered = render(numbers, "run no. (?)", gap="", sep=" ")
        return numbered if numbered.cell_len <= width else render(numbers, gap="", sep=" ")
    grouped = _by_run(entries, width)
    if grouped is not None:
        return grouped
    labels = [e.label for e in entries]
    prefix = os.path.commonprefix(labels) if len(labels) > 1 else ""
    prefix = prefix[:prefix.rfind(" ") + 1]  # whole words: 'seed1 vs base', 'seed1 step' share 'seed1 '
    if prefix:  # said once: 'seed1: ━━ vs base  ━━ step  ━━ union'
        text = Text(prefix.rstrip() + ": ")
        text.append_text(key_line([(e.label[len(prefix):], e.color) for e in entries], width - len(text)))
        return text
    share = max(3, width // len(entries) - len(SWATCH) - 3)
    return render([label if len(label) <= share else label[:share - 1] + "…" for label in labels])


def _by_run(entries: list[KeyEntry], width: int) -> Text | None:
    """Two or more runs with the same several series each: '4 ━━━ 5 ━━━ 6 ━━━  each: vs base, step, union', one
    swatch per series in its colour (None when the series are not so)."""
    runs: dict[int, list[KeyEntry]] = {}
    for e in entries:
        if e.run is None or not e.kind:
            return None
        runs.setdefault(e.run, []).append(e)
    kinds = [e.kind for e in next(iter(runs.values()))]
    if len(runs) < 2 or any([e.kind for e in group] != kinds for group in runs.values()):
        return None
    text = Text()
    for run, group in runs.items():
        text.append(f"{run} ")
        for e in group:
            text.append(SWATCH[0], style=swatch_style(e.color))
        text.append("  ")
    # what the swatches of a run are, said as fully as the width allows (never left out while it fits at all)
    for words in (f"each: {', '.join(kinds)}; runs by no. (?)", f"each: {', '.join(kinds)}", "/".join(kinds)):
        if text.cell_len + len(words) <= width:
            text.append(words, style="dim")
            break
    text.rstrip()
    return text


class ChartKey(Static):
    """The legend of the chart above it, one line that is kept at any width (plotext drops its own legend
    when the plot is too small for it)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.entries: list[KeyEntry] = []

    def show(self, entries: list[KeyEntry]) -> None:
        self.entries = entries
        self.display = bool(entries)
        self.update(key_line(entries, max(20, (self.size.width or 48))))

    def on_resize(self, _event) -> None:
        if self.entries:
            self.update(key_line(self.entries, max(20, self.size.width)))


class ChartPanel(PlotextPlot):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.data: ChartData | None = None
        self.key: list[KeyEntry] = []  # what ChartKey shows for this chart
        self._drawn_width: int | None = None  # the width the figure was laid out for (titles, wrapped messages)

    def show(self, data: ChartData, run_labels: list[str] | None = None) -> None:
        """Draw the chart; with two or more series, each gets a colour and `key` names it (by run number
        when it is one run's, from `run_labels`)."""
        self.data = data
        many = len(data.series) > 1 and not data.message and bool(data.x) and data.name != "overlap"
        self.key = key_entries(list(data.series), run_labels or []) if many else []
        self._draw(data)
        self.refresh()

    def render(self):
        # a panel shown a moment ago may have been drawn before it had its width: the title was then not
        # shortened (plotext drops it) and a message wrapped at the narrowest width, a word a line
        if self.data is not None and self._drawn_width != self.size.width:
            self._draw(self.data)
        return super().render()

    def _draw(self, data: ChartData) -> None:
        """Lay the figure out for the panel's current width (no refresh: render calls it too)."""
        self._drawn_width = self.size.width
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self._fit(data.title))
        if data.message or not data.x:
            self._show_message(data.title, data.message or "nothing to draw")
            return
        plt.xlabel(data.xlabel)
        plt.ylabel(data.ylabel)
        marked = getattr(data, "marked", None)
        if data.name == "overlap":
            self._lift_points(data)
        elif data.name == "agreement":
            labels = data.xticks or [str(x) for x in data.x]
            plt.multiple_bar(labels, [data.series[s] for s in data.series],
                             color=[series_color(i) for i in range(len(data.series))])
        elif data.name == "rank" and marked is None:
            ys = data.series["rank ratio"]
            plt.bar(list(range(len(ys))), ys)
            self._percent_axis()
            plt.xlabel("matrix (see table / export for names)")
        elif data.name == "rank":
            self._marked_bars(data, marked)
        else:
            for i, ys in enumerate(data.series.values()):  # the legend is the key line (ChartKey), never lost
                points = [(x, y) for x, y in zip(data.x, ys) if y == y]  # NaN: a point this series lacks
                if points:
                    plt.plot([x for x, _ in points], [y for _, y in points], marker="braille", color=series_color(i))
            if data.name in ("depth",):
                plt.xticks(data.x)
        if marked is not None and data.x and data.name == "delta":
            plt.vline(marked, color="red")
            plt.xlabel(f"{data.xlabel}; red: tolerance")
        elif marked is not None and data.x:
            self._mark(data, marked)

    def _show_message(self, title: str, message: str) -> None:
        """The message inside the frame, wrapped to its width (a title too wide for it shortened)."""
        plt = self.plt
        plt.title(self._fit(title))
        plt.xlabel("")
        plt.ylabel("")
        lines = textwrap.wrap(message, max(12, self.size.width - 8)) or [message]
        plt.xlim(0, 1)
        plt.ylim(0, 1)
        plt.xticks([])
        plt.yticks([])
        for i, line in enumerate(lines[:6]):
            plt.text(line, x=0.03, y=0.8 - i * 0.15, alignment="left")

    def _lift_points(self, data: ChartData) -> None:
        """Both lifts per pair (over the pooled and the stratified chance) on an axis fitted to them, so a few
        points' difference is visible."""
        plt = self.plt
        drawn = [(name, [(x, v, t) for x, v, t in zip(data.x, data.series[name], data.xticks) if v == v])
                 for name in ("lift", "lift_strat") if name in data.series]
        points = [p for _, pts in drawn for p in pts]
        ys = [v for _, v, _ in points]
        lo, hi = min(ys), max(ys)
        pad = max(0.1 * (hi - lo), 0.01 * hi, 1e-3)
        for (name, pts), colour in zip(drawn, ("green", "magenta")):
            if pts:
                plt.scatter([x for x, _, _ in pts], [v for _, v, _ in pts], marker="●", color=colour,
                            label="pooled chance" if name == "lift" else "stratified chance")
        xs = sorted({x for x, _, _ in points})
        ticks = {x: t for x, _, t in points}
        plt.ylim(lo - pad, hi + pad)
        plt.xlim(min(xs) - 0.5, max(xs) + 0.5)
        plt.xticks(xs, [ticks[x] for x in xs])
        plt.xlabel("pair i·j of chosen runs (numbers as in r and the heatmap, 7)")
        plt.ylabel(f"{data.ylabel} / chance")

    def _fit(self, title: str) -> str:
        """plotext drops a title wider than the plot: shorten it instead."""
        width = max(20, (self.size.width or 80) - 12)  # the y-axis ticks take some of the width
        return title if len(title) <= width else title[:width - 1] + "…"

    def _marked_bars(self, data: ChartData, marked: int) -> None:
        plt = self.plt
        pairs = list(zip(data.x, data.series["rank ratio"]))
        plt.bar([x for x, _ in pairs if x != marked], [y for x, y in pairs if x != marked], color="blue")
        plt.bar([x for x, _ in pairs if x == marked], [y for x, y in pairs if x == marked], color="red")
        self._percent_axis()

    def _percent_axis(self) -> None:
        """0-100 % in round ticks, with headroom above 100 for full bars (plotext's own ticks read 87.5, 105)."""
        self.plt.ylim(0, 105)
        self.plt.yticks([0, 25, 50, 75, 100])

    def _mark(self, data: ChartData, marked: int) -> None:
        """The focused layer: a red line and, on line charts, a red dot on each series."""
        plt = self.plt
        plt.xlim(min(data.x) - 0.5, max(data.x) + 0.5)
        plt.xticks(data.x)
        if marked in data.x and data.name != "rank":
            i = data.x.index(marked)
            ys = [ys[i] for ys in data.series.values()]
            plt.scatter([marked] * len(ys), ys, marker="●", color="red")
        plt.vline(marked, color="red")
        plt.xlabel(f"{data.xlabel} (red: focus)")
