"""The explorer app: owns the state; a thread worker runs the analysis (in a child process, see
analysis_process) and posts its events as messages; handlers update widgets."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import ContentSwitcher, DataTable, Footer, Header, Label, ProgressBar, Static, Tree

from rlsub_tui.checkpoints.kinship import NOT_A_FINE_TUNE, distance_warnings
from rlsub_tui.export.outputs import csv_text, provenance, sidecar_path, view_export_path, write_view_export
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.summaries import charts, strip, tables
from rlsub_tui.summaries.selection import SelectedStats, parse_runs
from rlsub_tui.summaries.tree import Node, build_tree, filter_tree, find
from rlsub_tui.ui.chart import ChartKey, ChartPanel
from rlsub_tui.ui.dialogs import (
    CriterionChoice,
    CriterionDialog,
    ErrorDialog,
    HelpScreen,
    WarningsScreen,
    keys_markdown,
)
from rlsub_tui.ui.filterbox import FilterBox
from rlsub_tui.ui.heatmap import HeatmapPanel
from rlsub_tui.ui.maskmap import MaskMapPanel
from rlsub_tui.ui.messages import (
    AnalysisFailed,
    AnalysisFinished,
    AnalysisOpened,
    DetailFailed,
    DetailReady,
    TensorsComputed,
    TimelineComputed,
    TimelineProgress,
    TreePreview,
)
from rlsub_tui.ui.runs import RunChooser
from rlsub_tui.ui.summary import SummaryStrip
from rlsub_tui.ui.table import ChildrenTable
from rlsub_tui.ui.tree import LayerTree
from rlsub_tui.util.errors import InputError
from rlsub_tui.util.formatting import duration, size

BATCH_SECONDS = 0.2  # the worker posts at most five batches a second
VIEWS = charts.VIEW_NAMES  # the order `]` and `[` cycle in
DETAIL_VIEWS = ("maskmap", "delta")  # computed on demand for the focused tensor


@dataclass
class ExplorerConfig:
    base: str
    runs: list[str]
    options: AnalysisOptions
    export_dir: Path
    timelines: dict = field(default_factory=dict)  # run index -> steps.Timeline, for the timeline chart
    step_gap: int = 1
    run_selection: str | None = None  # --runs: which runs the pooled figures use at start (default all)
    group_specs: list[tuple[str, str]] | None = None  # --group NAME=GLOB; None: groups from label prefixes
    # "process" (the CLI's): the analysis and the detail views run in a child process (analysis_process), so
    # this process never imports torch and its event loop never waits for the GIL; "thread": in this process,
    # where tests can patch the engine
    compute: str = "thread"


class ExplorerApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "rlsub-tui"

    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit", tooltip="Quit the explorer"),
        Binding("question_mark", "help", "Help", id="app.help", key_display="?", tooltip="Definitions of every column, and keys"),
        # priority: handled before the key is forwarded to the tree, so that keys typed right after
        # "/" (even in one burst) land in the filter box
        Binding("slash", "filter", "Filter", id="app.filter", key_display="/", priority=True,
                tooltip="Filter the tree by tensor name"),
        # priority: tab and shift+tab switch between the two panes only (the filter box is reached with "/"
        # only: it is outside the focus chain), so a second tab never lands typed keys in the filter
        Binding("tab,shift+tab", "switch_pane", "Pane", show=False, id="app.switch_pane", priority=True,
                tooltip="Switch between the tree and the table"),
        Binding("escape", "cancel_or_clear", "Cancel", id="app.cancel",
                tooltip="Cancel the computation (keeps what is done) or clear the filter"),
        Binding("e", "export_table", "Export", id="app.export_table", tooltip="Write the table to CSV"),
        Binding("x", "export_chart", "Chart CSV", show=False, id="app.export_chart",
                tooltip="Write the chart's data to CSV"),
        Binding("c", "criterion", "Criterion", id="app.criterion",
                tooltip="Change criterion, tolerance, sweep or comparison dtype"),
        Binding("s", "sort", "Sort", show=False, id="app.sort", tooltip="Sort the table by the next column"),
        Binding("S", "reverse_sort", "Reverse", show=False, id="app.reverse_sort", tooltip="Reverse the sort"),
        Binding("o", "overlap_metric", "o1/Jaccard", show=False, id="app.overlap_metric",
                tooltip="Overlap chart: o1 or Jaccard; heatmap: o1, Jaccard or lift"),
        Binding("b", "blocks", "Groups", show=False, id="app.blocks",
                tooltip="Heatmap: run groups × groups (within on the diagonal) or runs × runs"),
        Binding("r", "choose_runs", "Runs", id="app.choose_runs", tooltip="Choose the runs the pooled figures use"),
        Binding("w", "warnings", "Warnings", show=False, id="app.warnings",
                tooltip="Tensors not compared (and why) and other notes"),
        Binding("bracketright", "next_chart", "Chart", id="app.next_chart", tooltip="Next chart", key_display="]"),
        Binding("bracketleft", "previous_chart", "Prev chart", show=False, id="app.previous_chart",
                tooltip="Previous chart"),
        Binding("m", "next_map_run", "Map run", show=False, id="app.next_map_run",
                tooltip="Mask map: every chosen run together, or one run at a time"),
        *[Binding(v.key, f"chart('{v.name}')", v.label, show=False, id=f"app.chart_{v.name}", tooltip=v.help)
          for v in sorted(charts.VIEWS, key=lambda v: "1234567890tp".index(v.key))],
    ]

    # The view state: set one of these and the views that depend on it redraw themselves (their watchers below).
    # focus_node always redraws when set, even to the same node: its numbers may have changed (results arrived).
    focus_node: reactive[Node | None] = reactive(None, always_update=True, init=False)
    chart_name: reactive[str] = reactive("depth", init=False)
    overlap_metric: reactive[str] = reactive("o1", init=False)
    heatmap_measure: reactive[str] = reactive("o1", init=False)
    heatmap_blocks: reactive[bool] = reactive(False, init=False)  # b: groups × groups instead of runs × runs
    map_run: reactive[int | None] = reactive(None, init=False)  # mask map: None = every chosen run, else a run
    selected_runs: reactive[tuple[int, ...]] = reactive((), init=False)  # chosen runs (0-based)

    def __init__(self, config: ExplorerConfig):
        super().__init__()
        self.config = config
        self.options = config.options
        self.result = None  # AnalysisResult, once the worker has opened the checkpoints
        self.roots: list[Node] = []
        self.index: tables.StatsIndex | None = None
        self._preview_names: list[str] | None = None
        self.groups: list = []  # RunGroup list, set when the analysis opens
        self.tensor_details: dict[tuple, object] = {}  # (tensor, runs, generation) -> MatrixDetail or error
        self.details_pending: set[tuple] = set()
        self.filter_text = ""
        self.generation = 0
        self.running = False
        self.last_export: Path | None = None
        self.failed: str | None = None  # why the analysis could not start; quitting then exits with status 2
        self._dirty = False
        self.timeline = None  # timeline.TimelineResult, once computed
        self.timeline_state = "waiting" if config.timelines else "none"
        if config.compute == "process":
            from rlsub_tui.util.processes import start_server

            start_server()  # a few ms; its torch import, in its own process, overlaps the app's start and first paint

    # ----------------------------------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield FilterBox(placeholder="/ filter tensors by name", id="filter", compact=True)
                yield LayerTree(id="tree")
            with Vertical(id="right"):
                yield Label("", id="table-title")
                yield SummaryStrip(id="summary")
                yield ChildrenTable(id="table")
                with ContentSwitcher(initial="chart", id="views"):
                    yield ChartPanel(id="chart")
                    yield HeatmapPanel(id="heatmap")
                    yield MaskMapPanel(id="maskmap")
                yield ChartKey("", id="chart-key")
        with Horizontal(id="status"):
            yield ProgressBar(id="progress", show_eta=False, show_percentage=True)
            yield Static("opening checkpoints…", id="progress-text")
        yield Footer()

    def _settle_heap(self) -> None:
        """While it computes, exempt what lives now (widgets, the tree, the results so far, render caches) from
        the collector's full passes: over this heap one took 60-110 ms, a visible stall of the event loop. The
        young generations are collected first (a few ms); the analysis' end (and quitting) unfreezes it all."""
        if self.running:
            gc.collect(1)
            gc.freeze()

    def on_unmount(self) -> None:
        gc.unfreeze()

    def on_mount(self) -> None:
        self.sub_title = "opening checkpoints…"
        self.query_one(LayerTree).focus()
        self.set_interval(0.25, self._redraw_results)
        self.start_analysis()

    # ----------------------------------------------------------------------------------------- worker
    def start_analysis(self) -> None:
        self.generation += 1
        self.running = True
        self.timeline = None
        self.timeline_state = "waiting" if self.config.timelines else "none"
        self.query_one("#progress", ProgressBar).update(total=None, progress=0)
        self.analyze(self.generation)

    @work(thread=True, exclusive=True, exit_on_error=False, group="analysis")
    def analyze(self, generation: int) -> None:
        """The worker: the core's one entry point, its events posted as messages (batched), failures as a dialog."""
        from contextlib import closing

        from textual.worker import get_current_worker

        from rlsub_tui.analysis.child import AnalysisError, analyse_in_child
        from rlsub_tui.analysis.stream import analyse, batched

        worker, cfg = get_current_worker(), self.config
        run = analyse_in_child if cfg.compute == "process" else analyse
        if self.result is None:
            self._post_preview(generation)
        try:
            with closing(run(cfg.base, cfg.runs, self.options, cfg.timelines, cfg.step_gap,
                                 cancelled=lambda: worker.is_cancelled)) as events:
                for event in batched(events, BATCH_SECONDS):
                    self.post_message(_message(event, generation))
        except (InputError, AnalysisError) as exc:  # a sentence for the user either way
            self.post_message(AnalysisFailed(str(exc), generation))
        except Exception as exc:  # a failure in the worker becomes a dialog, never a crash
            self.post_message(AnalysisFailed(f"the analysis failed: {type(exc).__name__}: {exc}", generation))

    def _post_preview(self, generation: int) -> None:
        """The base's tensor names from its header alone, for a first paint before torch is imported."""
        from rlsub_tui.checkpoints.labels import checkpoint_label
        from rlsub_tui.checkpoints.preview import tensor_names

        names = tensor_names(self.config.base)
        if names:
            self.post_message(TreePreview(names, checkpoint_label(self.config.base), generation))

    # ----------------------------------------------------------------------------------------- messages
    def on_tree_preview(self, msg: TreePreview) -> None:
        if msg.generation != self.generation or self.result is not None:
            return
        self.roots = build_tree(msg.names, f"{msg.label} ({len(msg.names)} tensors)")
        self._preview_names = list(msg.names)
        self.focus_node = self.roots[0] if self.roots else None
        tree = self.query_one(LayerTree)
        tree.populate(self.roots, None)
        self.call_after_refresh(self._settle_heap)

    def on_analysis_opened(self, msg: AnalysisOpened) -> None:
        if msg.generation != self.generation:
            return
        old_key = self.focus_node.key if self.focus_node else None
        # the app owns this result (the core hands each consumer its own); only the UI thread writes into it
        r = self.result = msg.result
        self.failed = None
        if self._preview_names == list(r.planned) and not self.filter_text:
            # the preview drew exactly this tree: keep it (and the user's place in it), attach the numbers
            self.index = tables.StatsIndex(self.roots, self.result)
            tree = self.query_one(LayerTree)
            tree.attach_index(self.index)
            self.mutate_reactive(ExplorerApp.focus_node)  # same node, now with numbers
        else:
            self.roots = build_tree(self.result.planned, f"{r.base_label} ({len(r.planned)} tensors)")
            self._rebuild_tree(old_key)
        self._preview_names = None
        self._choose_initial_runs(r.run_labels)
        self._resolve_groups(r.run_labels)
        self.title = f"rlsub-tui · {r.device} · {r.base_label}"  # the device first: a narrow header cuts the end
        self.sub_title = (f"{r.k} run(s) · {r.criterion.describe()}"
                          + ("" if r.compare_dtype == "stored" else f" · compared in {r.compare_dtype}")
                          + (f" · sweep {len(r.sweep)}" if r.sweep else " · no sweep"))
        self.query_one("#progress", ProgressBar).update(total=len(r.planned), progress=0)
        self.query_one("#progress-text", Static).update(f"0/{len(r.planned)} tensors · {size(msg.bytes_total)} to read")
        for warning in (n for n in r.notes if NOT_A_FINE_TUNE in n):
            self.notify(warning, title="Not a fine-tune?", severity="error", timeout=30)
        if r.skipped or r.notes:
            shown = ", ".join(f"{k.tensor} [{k.run}]" for k in r.skipped[:3])
            more = f" and {len(r.skipped) - 3} more" if len(r.skipped) > 3 else ""
            text = (f"{len(r.skipped)} tensor(s) not compared: {shown}{more}. " if r.skipped else "") + \
                (f"{len(r.notes)} note(s). " if r.notes else "") + "Press w for the full list and reasons."
            self.notify(text, severity="warning", timeout=10)
        self.call_after_refresh(self._settle_heap)

    def _resolve_groups(self, labels: list[str]) -> None:
        from rlsub_tui.summaries.groups import resolve_groups

        try:
            self.groups = resolve_groups(self.config.group_specs, labels)
        except InputError as exc:
            self.groups = []
            self.push_screen(ErrorDialog("Cannot form these run groups", str(exc)))

    def _choose_initial_runs(self, labels: list[str]) -> None:
        self.selected_runs = tuple(range(len(labels)))
        if self.config.run_selection and self.generation == 1:
            try:
                self.selected_runs = parse_runs(self.config.run_selection, labels)
            except InputError as exc:
                self.push_screen(ErrorDialog("Cannot choose these runs; using all", str(exc)))
        elif self.selected_runs and max(self.selected_runs) >= len(labels):
            self.selected_runs = tuple(range(len(labels)))

    def on_tensors_computed(self, msg: TensorsComputed) -> None:
        if msg.generation != self.generation or self.result is None:
            return
        self.result.take(msg.results)
        if self.index is not None:
            for t in msg.results:
                self.index.add(t)
        self.query_one("#progress", ProgressBar).update(total=msg.total, progress=msg.done)
        rate = msg.bytes_done / msg.elapsed if msg.elapsed > 0 else 0.0
        left = (msg.bytes_total - msg.bytes_done) / rate if rate > 0 else float("nan")
        self.query_one("#progress-text", Static).update(
            f"{msg.done}/{msg.total} tensors · {size(rate)}/s · {duration(left)} left · esc cancels")
        self._dirty = True

    def on_timeline_progress(self, msg: TimelineProgress) -> None:
        if msg.generation == self.generation:
            self.query_one("#progress-text", Static).update(f"timeline: {msg.done}/{msg.total} tensors · esc cancels")

    def on_timeline_computed(self, msg: TimelineComputed) -> None:
        if msg.generation != self.generation:
            return
        self.timeline = msg.timeline
        self._dirty = True

    def on_analysis_finished(self, msg: AnalysisFinished) -> None:
        if msg.generation != self.generation:
            return
        self.running = False
        gc.unfreeze()
        if self.result is not None:
            self.result.finish(msg.complete, msg.notes)
        if self.timeline is None and self.config.timelines:
            self.timeline_state = "cancelled"
        done = len(self.result.tensors) if self.result else 0
        total = len(self.result.planned) if self.result else 0
        text = f"{done}/{total} tensors · " + ("complete" if msg.complete else "cancelled: showing what is done")
        self.query_one("#progress-text", Static).update(text)
        for warning in distance_warnings(self.result) if self.result else []:
            if warning not in self.result.notes:
                self.result.notes.append(warning)
                self.notify(warning, title="Not a fine-tune?", severity="error", timeout=30)
        self._dirty = True
        self._redraw_results()
        self.refresh_bindings()

    def on_analysis_failed(self, msg: AnalysisFailed) -> None:
        if msg.generation != self.generation:
            return
        self.running = False
        gc.unfreeze()
        self.timeline_state = "the timeline was not computed (the analysis failed)"
        if self.result is None:  # the analysis could not start: quitting now reports it in the exit status
            self.failed = msg.error
            self.sub_title = "could not open the checkpoints"
        self.query_one("#progress", ProgressBar).update(total=1, progress=0)  # stop the busy animation
        self.query_one("#progress-text", Static).update("failed: see the message")
        self.push_screen(ErrorDialog("Cannot analyse these checkpoints", msg.error))

    def _redraw_results(self) -> None:
        """Redraw labels, table and chart at most four times a second while results arrive."""
        if not self._dirty or self.result is None:
            return
        self._dirty = False
        self.query_one(LayerTree).refresh_labels()
        self.mutate_reactive(ExplorerApp.focus_node)
        self.call_after_refresh(self._settle_heap)

    # ----------------------------------------------------------------------------------------- views
    def _rebuild_tree(self, keep_key: str | None = None) -> None:
        tree = self.query_one(LayerTree)
        roots = filter_tree(self.roots, self.filter_text)
        self.index = tables.StatsIndex(roots, self.result)
        tree.populate(roots, self.index)
        if self.filter_text:
            for node in tree.root.children:
                node.expand_all()
        target = find(roots, keep_key) if keep_key else None
        self.focus_node = target or (roots[0] if roots else None)

    def watch_focus_node(self) -> None:
        self._show_focus()

    def watch_chart_name(self) -> None:
        self._show_view()

    def watch_overlap_metric(self) -> None:
        if self.chart_name == "overlap":
            self._show_view()

    def watch_heatmap_measure(self) -> None:
        if self.chart_name == "heatmap":
            self._show_view()

    def watch_heatmap_blocks(self) -> None:
        if self.chart_name == "heatmap":
            self._show_view()

    def watch_map_run(self) -> None:
        if self.chart_name == "maskmap":
            self._show_view()

    def watch_selected_runs(self) -> None:
        self._show_view()

    def _show_focus(self) -> None:
        """The table's title and rows, then the view, for the focused node."""
        node = self.focus_node
        if node is None and self.result is not None and self.filter_text:
            self._show_no_match()
            return
        if node is None or self.result is None:
            self.query_one("#table-title", Label).update("no tensors match" if self.filter_text else "")
            return
        table = self.query_one(ChildrenTable)
        table.show(*tables.node_table(node, self.result, self.index))
        kids = "one row per child" if node.children else "one row per run"
        self.query_one("#table-title", Label).update(f"{node.label} — {kids}")
        self._show_view()

    def _show_no_match(self) -> None:
        """A filter that matches no tensor: the title, strip, table and view all say so (none keeps the numbers
        of the node focused before)."""
        what = f"no tensors match '{self.filter_text.strip()}'"
        self.query_one("#table-title", Label).update(what)
        self.query_one(SummaryStrip).show([what, "esc clears the filter, / edits it"])
        self.query_one(ChildrenTable).show([], [])
        self.query_one(ContentSwitcher).current = "chart"
        self.query_one(ChartKey).show([])
        self.query_one(ChartPanel).show(charts.ChartData(self.chart_name, "nothing to show", "", "", [], {},
                                                         message=f"{what}: esc clears the filter"))

    def selected_stats(self) -> SelectedStats:
        st = self.index.get(self.focus_node) if self.index is not None else self.result.stats(self.focus_node.tensors)
        return SelectedStats(st, self.selected_runs or tuple(range(self.result.k)))

    def _show_view(self) -> None:
        """The summary strip, then the chart or the heatmap, for the focused node and the chosen runs."""
        if self.result is None or self.focus_node is None:
            return
        sel = self.selected_stats()
        summary = self.query_one(SummaryStrip)
        lines = strip.summary_lines(sel, max(32, (summary.size.width or 50) - 2))
        group_line = strip.groups_line(sel, self.groups)
        summary.show(strip.telling_lines(lines + ([group_line] if group_line else []), self.size.height))
        panel = self.chart_name if self.chart_name in ("heatmap", "maskmap") else "chart"
        self.query_one(ContentSwitcher).current = panel
        self.query_one(ChartKey).show([])  # the chart drawn below, if any, gives its key
        if self.chart_name == "heatmap":
            self._show_heatmap(sel)
        elif self.chart_name in DETAIL_VIEWS:
            self._show_detail(sel)
        else:
            self._draw_chart(self.current_chart())

    def _draw_chart(self, data: charts.ChartData) -> None:
        chart = self.query_one(ChartPanel)
        chart.show(data, self.result.run_labels)
        self.query_one(ChartKey).show(chart.key)

    # ----------------------------------------------------------------------------------- one tensor closely
    def _detail_key(self, sel: SelectedStats) -> tuple:
        return (self.focus_node.tensors[0], sel.runs, self.generation)

    def _show_detail(self, sel: SelectedStats) -> None:
        node = self.focus_node
        if not node.is_tensor:
            self._detail_message("move to a single tensor (a leaf of the tree) to look inside it")
            return
        key = self._detail_key(sel)
        found = self.tensor_details.get(key)
        if found is None:
            self._detail_message(f"reading {node.tensors[0]} from the checkpoints…")
            if key not in self.details_pending:  # redraws while it is read must not start it again
                self.details_pending.add(key)
                self.inspect_tensor(key)
        elif isinstance(found, str):
            self._detail_message(found)
        else:
            self._draw_detail(found)

    def _detail_message(self, message: str) -> None:
        if self.chart_name == "maskmap":
            self.query_one(MaskMapPanel).show_message("mask map", message)
        else:
            self.query_one(ChartPanel).show(charts.ChartData("delta", "log2 |Δ|", "", "", [], {}, message=message))

    def _draw_detail(self, detail) -> None:
        if self.chart_name == "delta":
            self._draw_chart(charts.delta_chart(detail, self.result.run_labels))
            return
        which = detail.runs.index(self.map_run) if self.map_run in detail.runs else None
        who = "every chosen run" if which is None else self.result.run_labels[self.map_run]
        shape = "×".join(map(str, detail.shape))
        leaf = detail.name.split(".")[-2] if "." in detail.name else detail.name
        title = f"{leaf} {shape} updated by {who} (m)"
        panel = self.query_one(MaskMapPanel)
        panel.show(title, detail.resampled(*panel.map_size()).fraction(which))

    @work(thread=True, exit_on_error=False, group="detail")
    def inspect_tensor(self, key: tuple) -> None:
        """Reads one tensor with torch: in a child process like the analysis (see ExplorerConfig.compute)."""
        from rlsub_tui.analysis.child import AnalysisError, detail_in_child

        name, runs, _ = key
        cfg = self.config
        try:
            if cfg.compute == "process":
                found = detail_in_child(cfg.base, cfg.runs, self.options, name, runs)
            else:
                from rlsub_tui.compute.matrix_detail import detail, read_tensor

                found = detail(name, read_tensor(cfg.base, cfg.runs, self.options, name), self.options, runs)
            self.post_message(DetailReady(key, found))
        except (InputError, AnalysisError) as exc:
            self.post_message(DetailFailed(key, str(exc)))
        except Exception as exc:  # shown in the panel, never a crash
            self.post_message(DetailFailed(key, f"cannot read {name}: {type(exc).__name__}: {exc}"))

    def on_detail_ready(self, msg: DetailReady) -> None:
        self.details_pending.discard(msg.key)
        self.tensor_details[msg.key] = msg.detail
        if self.chart_name in DETAIL_VIEWS:
            self._show_view()

    def on_detail_failed(self, msg: DetailFailed) -> None:
        self.details_pending.discard(msg.key)
        self.tensor_details[msg.key] = msg.error
        if self.chart_name in DETAIL_VIEWS:
            self._show_view()

    def action_next_map_run(self) -> None:
        runs = list(self.selected_runs or range(self.result.k))
        order = [None] + runs
        i = order.index(self.map_run) if self.map_run in order else 0
        self.map_run = order[(i + 1) % len(order)]
        self.chart_name = "maskmap"

    def _show_heatmap(self, sel: SelectedStats) -> None:
        message = None if len(sel.runs) >= 2 else "the heatmap needs two or more chosen runs: press r"
        message = message or (None if sel.numel else "waiting for results…")
        panel = self.query_one(HeatmapPanel)
        if self.heatmap_blocks and self.groups:
            names, grid = strip.block_grid(sel, self.groups, self.heatmap_measure)
            panel.show(grid if not message else [], names, list(range(1, len(names) + 1)), self.heatmap_measure,
                       message, what="groups")
            return
        grid = strip.overlap_grid(sel, self.heatmap_measure) if not message else []
        panel.show(grid, [self.result.run_labels[i] for i in sel.runs], [i + 1 for i in sel.runs],
                   self.heatmap_measure, message)

    def on_resize(self, _event) -> None:
        if self.result is not None:
            self.call_after_refresh(self.mutate_reactive, ExplorerApp.focus_node)  # widths changed

    def current_chart(self) -> charts.ChartData:
        sel = self.selected_stats()
        data = charts.chart(self.chart_name, self.focus_node, self.result, sel, self.overlap_metric,
                            self.timeline, self.timeline_state)
        chosen = {self.result.run_labels[i] for i in sel.runs}
        if set(data.series) <= set(self.result.run_labels):  # one series per run: keep the chosen ones
            data.series = {k: v for k, v in data.series.items() if k in chosen}
        return data

    @on(LayerTree.NodeHighlighted)
    def _highlighted(self, event: LayerTree.NodeHighlighted) -> None:
        if event.node is not self.query_one(LayerTree).cursor_node:
            return  # the cursor has moved on since (or the tree was rebuilt): the focus follows where it is now
        if event.node.data is not None and event.node.data is not self.focus_node:
            self.focus_node = event.node.data

    @on(LayerTree.NodeSelected)
    def _selected(self, event: LayerTree.NodeSelected) -> None:
        if event.node.data is not None:
            self.focus_node = event.node.data

    @on(LayerTree.AfterKeys)
    def _after_tree_keys(self, msg: LayerTree.AfterKeys) -> None:
        msg.callback()

    @on(ChildrenTable.RowSelected)
    def _table_row_opened(self, event: ChildrenTable.RowSelected) -> None:
        """Enter on a child's row: that child becomes the focused node, shown in the tree (its ancestors
        expanded); the table, still focused, then lists its children. A tensor's rows (runs) open nothing."""
        node, table = self.focus_node, self.query_one(ChildrenTable)
        i = table.given_index(event.cursor_row)
        if node is None or not node.children or i is None or i >= len(node.children):
            return
        child = node.children[i]
        tree = self.query_one(LayerTree)
        found = next((tn for tn in _tree_nodes(tree.root) if tn.data is child), None)
        if found is not None:
            parent = found.parent
            while parent is not None:
                parent.expand()
                parent = parent.parent
            tree.move_cursor(found, animate=False)
        self.focus_node = child

    # ----------------------------------------------------------------------------------------- actions
    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("filter", "switch_pane") and len(self.screen_stack) > 1:
            return False  # a dialog or the palette is open: "/" is a character, tab moves between its fields
        if action in ("export_table", "export_chart", "sort", "next_chart", "previous_chart", "chart",
                      "overlap_metric", "reverse_sort", "warnings", "choose_runs", "blocks",
                      "next_map_run") and self.result is None:
            return None
        return True

    async def action_quit(self) -> None:
        self.exit(return_code=2 if self.failed else 0)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self._session_text(), keys_markdown(self.help_bindings())))

    @staticmethod
    def help_bindings() -> list[tuple[str, list[Binding]]]:
        """Every key bound, where it works: what the help's keys table is built from."""
        return [("anywhere", list(ExplorerApp.BINDINGS)
                 + [Binding(ExplorerApp.COMMAND_PALETTE_BINDING, "command_palette", "Command palette")]),
                ("tree", list(Tree.BINDINGS) + list(LayerTree.BINDINGS)),
                ("filter box", list(FilterBox.BINDINGS)),
                ("table", list(DataTable.BINDINGS) + list(ChildrenTable.BINDINGS)),
                ("help", list(HelpScreen.BINDINGS))]

    def _session_text(self) -> str:
        """The help's last section: what this explorer compares, runs numbered as in the charts."""
        r = self.result
        if r is None:
            return f"Opening {self.config.base} and {len(self.config.runs)} run(s)…"
        dtype = r.compare_dtype if r.compare_dtype != "stored" else "each pair's less precise dtype"
        lines = [f"Base: `{r.base_label}` ({r.base_path})  ", f"Criterion: {r.criterion.describe()}; sweep: "
                 + (", ".join(f"{t:g}" for t in r.sweep) if r.sweep else "off")
                 + f"; compared in {dtype}; device {r.device}", "",
                 "Runs (i and j in the overlap chart's `i·j`):", ""]
        lines += [f"- run {i + 1}: `{label}` {path}" for i, (label, path) in enumerate(zip(r.run_labels, r.run_paths))]
        return "\n".join(lines)

    def action_warnings(self) -> None:
        self.push_screen(WarningsScreen(self.result.skipped, self.result.notes + self._tensor_notes()))

    def _tensor_notes(self) -> list[str]:
        return sorted({f"{name}: {n}" for name, t in self.result.tensors.items() for n in t.notes})

    def action_switch_pane(self) -> None:
        tree, table = self.query_one(LayerTree), self.query_one(ChildrenTable)
        (table if self.focused is tree else tree).focus()

    def action_filter(self) -> None:
        # always on screen (one line), so it can take focus at once: keys typed right after "/"
        # must land in the box, not in the tree
        self.query_one(FilterBox).open()

    def _set_filter(self, text: str) -> None:
        if text == self.filter_text:
            return
        self.filter_text = text
        if self.result is not None:
            self._rebuild_tree(self.focus_node.key if self.focus_node else None)

    @on(FilterBox.Changed, "#filter")
    def _filter_changed(self, event: FilterBox.Changed) -> None:
        if event.value == event.input.value:  # else a value the box has typed past (or enter applied) since
            self._set_filter(event.value)

    def action_apply_filter(self) -> None:
        """enter in the filter box: the filter as typed applies now, the tree takes the keys with its cursor
        on the filtered tree's first row (the matching tensors pooled), and the strip and table show that row.
        A filter that matches nothing keeps the box focused, to edit it, and every view says so."""
        self._set_filter(self.query_one(FilterBox).value)
        tree = self.query_one(LayerTree)
        if self.result is not None and self.focus_node is None:
            self.notify(f"No tensor name contains '{self.filter_text.strip()}': edit the filter, or esc clears it.",
                        severity="warning")
            return
        self.screen.set_focus(tree)  # now, not after a refresh (as focus() would): the next key is the tree's
        # after the keys the tree still holds (typed before "/"), before those typed after enter
        tree.post_message(LayerTree.AfterKeys(self._cursor_to_top))

    def _cursor_to_top(self) -> None:
        tree = self.query_one(LayerTree)
        first = tree.get_node_at_line(0)
        if first is not None:
            tree.move_cursor(first, animate=False)
            if first.data is not None:
                self.focus_node = first.data

    def action_clear_filter(self) -> None:
        """esc in the filter box (or, with a filter on, anywhere): the whole tree again, the tree focused."""
        box = self.query_one(FilterBox)
        self._set_filter("")
        box.value = ""
        self.screen.set_focus(self.query_one(LayerTree))

    def action_cancel_or_clear(self) -> None:
        if self.focused is self.query_one(FilterBox) or self.filter_text:
            self.action_clear_filter()
            return
        if self.running:
            self.workers.cancel_group(self, "analysis")
            self.notify("Cancelling: the computation stops after the tensor in progress (in a child process: "
                        "within half a second), keeping what is done.")

    def action_sort(self) -> None:
        self.query_one(ChildrenTable).cycle_sort()
        self.query_one(ChildrenTable).redraw()

    def action_reverse_sort(self) -> None:
        self.query_one(ChildrenTable).reverse_sort()
        self.query_one(ChildrenTable).redraw()

    def action_chart(self, name: str) -> None:
        self.chart_name = name

    def action_next_chart(self) -> None:
        i = VIEWS.index(self.chart_name)
        self.action_chart(VIEWS[(i + 1) % len(VIEWS)])

    def action_previous_chart(self) -> None:
        i = VIEWS.index(self.chart_name)
        self.action_chart(VIEWS[(i - 1) % len(VIEWS)])

    def action_overlap_metric(self) -> None:
        if self.chart_name == "heatmap":
            i = strip.MEASURES.index(self.heatmap_measure)
            self.heatmap_measure = strip.MEASURES[(i + 1) % len(strip.MEASURES)]
            return
        self.chart_name = "overlap"
        self.overlap_metric = "jaccard" if self.overlap_metric == "o1" else "o1"

    def action_blocks(self) -> None:
        if not self.groups:
            self.notify("No run groups: start with --group NAME=GLOB, or name runs NAME-seedN.", severity="warning")
            return
        self.chart_name = "heatmap"
        self.heatmap_blocks = not self.heatmap_blocks

    def action_choose_runs(self) -> None:
        def apply(chosen: tuple[int, ...] | None) -> None:
            if chosen:
                self.selected_runs = chosen

        self.push_screen(RunChooser(self.result.run_labels, self.selected_runs), apply)

    def _export(self, what: str, text: str, meta: dict) -> None:
        """Write the CSV and, beside it, NAME.json saying what it shows and how it was computed."""
        key = self.focus_node.key if self.focus_node else "model"
        path = view_export_path(self.config.export_dir, key, what, self.filter_text)
        try:
            write_view_export(path, text, meta)
        except OSError as exc:
            self.push_screen(ErrorDialog("Export failed", f"{path}: cannot be written ({exc.strerror or exc})."))
            return
        self.last_export = path
        partial = "" if meta["complete"] else \
            f" Partial: {meta['tensors_computed']}/{meta['tensors']} tensors computed, the rest left empty."
        shown = f" Filtered: only tensors matching '{self.filter_text}'." if self.filter_text else ""
        self.notify(f"wrote {path} (what it shows: {sidecar_path(path).name}).{shown}{partial}",
                    title="Exported", severity="warning" if partial else "information", timeout=10)

    def _nothing_computed(self) -> bool:
        node = self.focus_node
        if node is None or self.result is None:
            return True
        if not any(t in self.result.tensors for t in node.tensors):
            self.notify(f"Nothing computed yet for {node.label}: nothing exported.", severity="warning")
            return True
        return False

    def action_export_table(self) -> None:
        if self._nothing_computed():
            return
        table = self.query_one(ChildrenTable)
        cols = table.columns_spec
        header = [c.key for c in cols]
        rows = [[r[c.key] for c in cols] for r in table.rows_data]
        kids = "one row per child" if self.focus_node.children else "one row per run"
        meta = provenance(self.result, f"table of {self.focus_node.label} ({self.focus_node.key}), {kids}",
                          self.focus_node.tensors, {c.key: c.help for c in cols}, self.filter_text)
        self._export("table", csv_text(header, rows), meta)

    def action_export_chart(self) -> None:
        if self._nothing_computed():
            return
        if self.chart_name in DETAIL_VIEWS:
            found = self.tensor_details.get(self._detail_key(self.selected_stats())) if self.focus_node.is_tensor else None
            if found is None or isinstance(found, str):
                self.notify("Nothing to export yet: focus a tensor and wait for its map.", severity="warning")
                return
            header, rows = strip.detail_rows(found, self.result.run_labels, self.chart_name)
            what = ("mask map: per block of rows and columns, the fraction of its parameters updated"
                    if self.chart_name == "maskmap" else "Δ histogram: parameters per log2 |Δ| bin, per run")
            meta = provenance(self.result, f"{what}, of {self.focus_node.label} ({self.focus_node.key})",
                              self.focus_node.tensors, {h: "" for h in header}, self.filter_text)
            self._export(self.chart_name, csv_text(header, rows), meta)
            return
        if self.chart_name == "heatmap":
            sel = self.selected_stats()
            if self.heatmap_blocks and self.groups:
                header, rows = strip.block_rows(sel, self.groups, self.heatmap_measure)
            else:
                header, rows = strip.grid_rows(sel, self.result.run_labels, self.heatmap_measure)
            what = "groups" if self.heatmap_blocks and self.groups else "heatmap"
            meta = provenance(self.result, f"overlap {what} ({self.heatmap_measure}; row A, column B) of "
                              f"{self.focus_node.label}", self.focus_node.tensors, strip.grid_columns(header),
                              self.filter_text)
            self._export(f"{what}-{self.heatmap_measure}", csv_text(header, rows), meta)
            return
        data = self.current_chart()
        if data.message:
            self.notify(f"The chart has no data to export: {data.message}", severity="warning")
            return
        header, rows = data.rows()
        meta = provenance(self.result, f"chart '{data.title}' of {self.focus_node.label} ({self.focus_node.key})",
                          self.focus_node.tensors, data.columns(), self.filter_text,
                          timeline=self.timeline if data.name == "timeline" else None)
        self._export(f"chart-{data.name}", csv_text(header, rows), meta)

    def action_criterion(self) -> None:
        o = self.options
        current = CriterionChoice(o.criterion.name,
                                  o.criterion.value if o.criterion.name == "atol" else 1e-5,
                                  o.criterion.value if o.criterion.name == "relative" else 1e-3,
                                  tuple(o.sweep), o.compare_dtype)

        def apply(choice: CriterionChoice | None) -> None:
            if choice is None:
                return
            from rlsub_tui.records.criteria import Criterion

            value = {"atol": choice.tolerance, "relative": choice.eta}.get(choice.criterion, 0.0)
            try:
                self.options = replace(self.options, criterion=Criterion(choice.criterion, value),
                                       sweep=choice.sweep, compare_dtype=choice.compare_dtype)
            except InputError as exc:
                self.push_screen(ErrorDialog("Invalid criterion", str(exc)))
                return
            self.workers.cancel_group(self, "analysis")
            self.start_analysis()

        self.push_screen(CriterionDialog(current), apply)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Export table", "Write the table to CSV", self.action_export_table)
        yield SystemCommand("Export chart data", "Write the chart's data to CSV", self.action_export_chart)
        yield SystemCommand("Change criterion or tolerance", "Recompute with another criterion or comparison dtype",
                            self.action_criterion)
        yield SystemCommand("Filter tree", "Filter the tree by tensor name", self.action_filter)
        yield SystemCommand("Cancel computation", "Stop, keeping what is done", self.action_cancel_or_clear)
        yield SystemCommand("Sort table", "Sort by the next column", self.action_sort)
        yield SystemCommand("Reverse sort", "Reverse the table's order", self.action_reverse_sort)
        yield SystemCommand("Toggle overlap metric", "o1 or Jaccard (heatmap: or lift)", self.action_overlap_metric)
        yield SystemCommand("Choose runs", "The runs the pooled figures use", self.action_choose_runs)
        yield SystemCommand("Overlap heatmap", "Every pair of chosen runs, coloured by lift",
                            lambda: self.action_chart("heatmap"))
        for name in charts.CHARTS:
            yield SystemCommand(f"Chart: {charts.CHART_TITLES[name]}", "Show this chart",
                                lambda n=name: self.action_chart(n))
        yield SystemCommand("Warnings", "Tensors not compared, and notes", self.action_warnings)
        yield SystemCommand("Help", "Definitions and keys", self.action_help)


def _message(event, generation: int):
    """The message the worker posts for one event of the analysis (analysis.analyse, batched)."""
    from rlsub_tui.records.events import Computed, Opened, TimelineDone, TimelineStep

    if isinstance(event, Opened):
        return AnalysisOpened(event.result, event.bytes_total, generation)
    if isinstance(event, Computed):
        p = event.progress
        return TensorsComputed(event.results, p.done, p.total, p.bytes_done, p.bytes_total, p.elapsed, generation)
    if isinstance(event, TimelineStep):
        return TimelineProgress(event.progress.done, event.progress.total, generation)
    if isinstance(event, TimelineDone):
        return TimelineComputed(event.timeline, generation)
    return AnalysisFinished(event.complete, generation, event.notes)


def _tree_nodes(node):
    """Every node of a Textual tree below `node`, depth first."""
    for child in node.children:
        yield child
        yield from _tree_nodes(child)
