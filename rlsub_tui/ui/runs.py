"""The run chooser: a checkbox per run; the pooled figures, charts and heatmap use the checked runs."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, SelectionList


class RunChooser(ModalScreen[tuple[int, ...] | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="runs.cancel"),
                Binding("enter", "done", "Done", id="runs.done", priority=True),
                Binding("a", "all", "All", id="runs.all")]

    def __init__(self, labels: list[str], chosen: tuple[int, ...]):
        super().__init__()
        self.labels = labels
        self.chosen = chosen

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="runs-box"):
            yield Label("Runs in the pooled figures", id="runs-title")
            yield SelectionList[int](*[(f"{i + 1} {label}", i, i in self.chosen)
                                       for i, label in enumerate(self.labels)], id="runs-list")
            yield Label("space toggles · a all · enter applies · esc cancels", classes="hint")
            yield Label("", id="runs-error")

    def on_mount(self) -> None:
        self.query_one(SelectionList).focus()

    def action_all(self) -> None:
        self.query_one(SelectionList).select_all()

    def action_done(self) -> None:
        chosen = tuple(sorted(self.query_one(SelectionList).selected))
        if not chosen:
            self.query_one("#runs-error", Label).update("choose at least one run")
            return
        self.dismiss(chosen)

    def action_cancel(self) -> None:
        self.dismiss(None)
