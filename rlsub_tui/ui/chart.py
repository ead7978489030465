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
        plt.title(data.title)
        if data.message or not data.x:
            self._show_message(data.title, data.message or "nothing to draw")
            return
        plt.xlabel(data.xlabel)
        plt.ylabel(data.ylabel)
        if data.name in ("overlap", "agreement"):
            labels = data.xticks or [str(x) for x in data.x]
            plt.multiple_bar(labels, [data.series[s] for s in data.series], labels=list(data.series))
        elif data.name == "rank":
            ys = data.series["rank ratio"]
            plt.bar(list(range(len(ys))), ys)
            plt.ylim(0, 105)
            plt.xlabel("matrix (see table / export for names)")
        else:
            for label, ys in data.series.items():
                points = [(x, y) for x, y in zip(data.x, ys) if y == y]  # NaN: a point this series lacks
                if points:
                    plt.plot([x for x, _ in points], [y for _, y in points], label=label, marker="braille")
            if data.name in ("depth",):
                plt.xticks(data.x)
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
