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
        if data.name == "overlap":
            self._lift_points(data)
        elif data.name == "agreement":
            labels = data.xticks or [str(x) for x in data.x]
            plt.multiple_bar(labels, [data.series[s] for s in data.series], labels=list(data.series))
        elif data.name == "rank":
            ys = data.series["rank ratio"]
            plt.bar(list(range(len(ys))), ys)
            plt.ylim(0, 105)
            plt.xlabel("matrix (see table / export for names)")
        else:
            for label, ys in data.series.items():
                plt.plot(data.x, ys, label=label, marker="braille")
            if data.name in ("depth",):
                plt.xticks(data.x)
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
