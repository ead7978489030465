"""The chart panel: draws a ChartData (built in the core) with textual-plotext."""

from __future__ import annotations

import textwrap

from textual_plotext import PlotextPlot

from rlsub_tui.explore import ChartData


class ChartPanel(PlotextPlot):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.data: ChartData | None = None

    def show(self, data: ChartData) -> None:
        self.data = data
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
            plt.multiple_bar(labels, [data.series[s] for s in data.series], labels=list(data.series))
        elif data.name == "rank" and marked is None:
            ys = data.series["rank ratio"]
            plt.bar(list(range(len(ys))), ys)
            plt.ylim(0, 105)
            plt.xlabel("matrix (see table / export for names)")
        elif data.name == "rank":
            self._marked_bars(data, marked)
        else:
            for label, ys in data.series.items():
                points = [(x, y) for x, y in zip(data.x, ys) if y == y]  # NaN: a point this series lacks
                if points:
                    plt.plot([x for x, _ in points], [y for _, y in points], label=label, marker="braille")
            if data.name in ("depth",):
                plt.xticks(data.x)
        if marked is not None and data.x and data.name == "delta":
            plt.vline(marked, color="red")
            plt.xlabel(f"{data.xlabel}; red: tolerance")
        elif marked is not None and data.x:
            self._mark(data, marked)
        self.refresh()

    def _show_message(self, title: str, message: str) -> None:
        """The message inside the frame, wrapped to its width (a long title alone would be dropped)."""
        plt = self.plt
        plt.title(title)
        plt.xlabel("")
        plt.ylabel("")
        lines = textwrap.wrap(message, max(12, self.size.width - 8)) or [message]
        plt.xlim(0, 1)
        plt.ylim(0, 1)
        plt.xticks([])
        plt.yticks([])
        for i, line in enumerate(lines[:6]):
            plt.text(line, x=0.03, y=0.8 - i * 0.15, alignment="left")
        self.refresh()

    def _lift_points(self, data: ChartData) -> None:
        """Lift per pair on an axis fitted to the lifts, so a few points' difference is visible."""
        plt = self.plt
        xs = [x for x, v in zip(data.x, data.series["lift"]) if v == v]
        ys = [v for v in data.series["lift"] if v == v]
        ticks = [t for t, v in zip(data.xticks, data.series["lift"]) if v == v]
        lo, hi = min(ys), max(ys)
        pad = max(0.1 * (hi - lo), 0.01 * hi, 1e-3)
        plt.scatter(xs, ys, marker="●", color="green")
        plt.ylim(lo - pad, hi + pad)
        plt.xlim(min(xs) - 0.5, max(xs) + 0.5)
        plt.xticks(xs, ticks)
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
        plt.ylim(0, 105)

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
