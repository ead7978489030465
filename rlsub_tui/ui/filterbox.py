"""The tree's filter box: reached with "/" only, and left with enter (apply) or esc (clear) in order with the
characters typed before them, so that keys typed right after land in the tree, never in the box."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.widgets import Input


class FilterBox(Input):
    """An Input outside the focus chain: tab, shift+tab and Textual's own focus moves never land here."""

    # Every key sent to the box is handled in _on_key, in the box's own queue, bindings included: a Textual
    # binding would run only once the key had bubbled up to the app, after the keys typed behind it were sent
    # on (to the box, or to the tree if the focus had moved), so enter, esc and the editing keys take effect
    # in the order typed
    BINDINGS = [
        Binding("enter", "app.apply_filter", "Apply", show=False, id="filter.apply",
                tooltip="Apply the filter: the tree takes the keys, its cursor on the filtered tree's top row"),
        Binding("escape", "app.clear_filter", "Clear", show=False, id="filter.clear",
                tooltip="Clear the filter and go back to the tree"),
    ]

    def __init__(self, **kw):
        super().__init__(**kw)
        self._open = False

    def allow_focus(self) -> bool:
        return self._open

    def open(self) -> None:
        """Take the focus ("/")."""
        self._open = True
        self.screen.set_focus(self)

    def on_blur(self) -> None:
        if self.screen.focused is not self:  # a blur that "/" has not already overtaken
            self._open = False

    async def _on_key(self, event: events.Key) -> None:
        if self.screen.focused is not self:
            # sent here before enter or esc moved the focus on: typed for the widget focused now
            event.stop()
            event.prevent_default()
            self.app.post_message(events.Key(event.key, event.character))
            return
        for binding in self._bindings.key_to_bindings.get(event.key, ()):  # ours, then Input's editing keys
            if await self.app.run_action(binding.action, self):  # True once run (Widget.run_action says nothing)
                event.stop()
                event.prevent_default()
                return
