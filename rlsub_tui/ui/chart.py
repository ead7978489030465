"""The chart panel: draws a ChartData (built in the core) with textual-plotext."""

from __future__ import annotations

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
            plt.xlabel("")
            plt.ylabel("")
            plt.title(f"{data.title}: {data.message or 'nothing to draw'}")
            self.refresh()
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
