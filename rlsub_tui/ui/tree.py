"""The layer tree: model → layers → submodules → tensors, and the same tensors by type."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.strip import Strip
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from rlsub_tui.summaries.tables import StatsIndex
from rlsub_tui.summaries.tree import Node
from rlsub_tui.ui.clipping import mark_clipped
from rlsub_tui.util.formatting import pct

BAR_WIDTH = 6


def sparsity_bar(sparsity: float) -> str:
    """A small bar whose filled part is the *updated* share, so dense nodes stand out."""
    if sparsity != sparsity:  # NaN: not computed yet
        return "·" * BAR_WIDTH
    filled = round((1 - sparsity) * BAR_WIDTH)
    return "█" * filled + "░" * (BAR_WIDTH - filled)


def node_label(node: Node, index: StatsIndex | None) -> Text:
    """Sparsity and bar first, so they stay visible in a narrow pane; then the name (a Text, never markup)."""
    # the Tree draws "▶ " before an expandable node and nothing before a leaf: pad leaves by as much, so
    # the numbers of siblings line up whatever their expand state
    text = Text("" if node.children else "  ")
    s = index.get(node) if index is not None else None
    if s is None or s.tensors == 0:
        text.append(f"{'…':>6} {'·' * BAR_WIDTH} ", style="dim")
    else:
        sp = s.mean_sparsity()
        text.append(f"{pct(sp):>6} ", style="bold" if sp == sp and sp < 0.5 else "")
        text.append(sparsity_bar(sp) + " ", style="cyan")
    text.append(node.label)
    if s is not None and 0 < s.tensors < len(node.tensors):
        text.append(f" {s.tensors}/{len(node.tensors)}", style="dim")
    return text


class LayerTree(Tree[Node]):
    """A Tree with vim keys; labels show each node's pooled sparsity and a bar."""

    BINDINGS = [
        Binding("enter", "select_cursor", "Focus", show=False, id="tree.focus",
                tooltip="Focus the node: the table and the chart follow it"),
        Binding("j", "cursor_down", "Down", show=False, id="tree.down"),
        Binding("k", "cursor_up", "Up", show=False, id="tree.up"),
        Binding("h,left", "collapse_or_parent", "Collapse", show=False, id="tree.collapse"),
        Binding("l,right", "expand_node", "Expand", show=False, id="tree.expand"),
        Binding("g,home", "first", "Top", show=False, id="tree.top"),
        Binding("G,end", "last", "Bottom", show=False, id="tree.bottom"),
    ]

    class AfterKeys(Message):
        """Posted to the tree, it reaches the app behind every key the tree holds now (a key's binding runs
        when the key, bubbling up the same way, reaches the app): the app then runs `callback`, after those
        keys and before any sent to the tree since."""

        def __init__(self, callback: Callable[[], None]):
            super().__init__()
            self.callback = callback

    def __init__(self, **kw):
        super().__init__("checkpoints", **kw)
        self.show_root = False
        self.guide_depth = 2
        self.auto_expand = False  # action_select_cursor expands and collapses itself
        self._index: StatsIndex | None = None

    def populate(self, roots: list[Node], index: StatsIndex | None) -> None:
        """Show these trees, the first one expanded."""
        self.clear()
        self._index = index
        for i, r in enumerate(roots):
            self._add(self.root, r, index, expand=(i == 0))
        self.root.expand()
        if roots:
            self.cursor_line = 0

    def _add(self, parent: TreeNode, node: Node, index, expand=False) -> None:
        if node.children:
            t = parent.add(node_label(node, index), data=node, expand=expand)
            for c in node.children:
                self._add(t, c, index)
        else:
            parent.add_leaf(node_label(node, index), data=node)

    def attach_index(self, index: StatsIndex) -> None:
        self._index = index
        self.refresh_labels()

    def refresh_labels(self, under: TreeNode | None = None) -> None:
        """Relabel the nodes a user can see (collapsed subtrees are relabelled when expanded)."""
        def visit(tn: TreeNode):
            for child in tn.children:
                if child.data is not None:
                    child.set_label(node_label(child.data, self._index))
                if child.is_expanded:
                    visit(child)
        visit(under or self.root)

    def on_tree_node_expanded(self, event: Tree.NodeExpanded) -> None:
        self.refresh_labels(event.node)

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        index = y + self.scroll_offset.y
        lines = self._tree_lines
        if 0 <= index < len(lines):
            line = lines[index]
            full = self.get_label_width(line.node) + line._get_guide_width(self.guide_depth, self.show_root)
            visible = self.scrollable_content_region.width
            if full > self.scroll_x + visible:
                return mark_clipped(strip, visible)
        return strip

    def action_select_cursor(self) -> None:
        """enter (or a click on a label): focus the node, and expand or collapse it, except that a top-level
        node (the model, "by type") only ever expands: collapsing it would hide the whole tree."""
        node = self.cursor_node
        if node is None:
            return
        if node.allow_expand and not (node.is_expanded and node.parent is self.root):
            node.toggle()
        self.post_message(Tree.NodeSelected(node))

    def action_collapse_or_parent(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.allow_expand and node.is_expanded:
            node.collapse()
        elif node.parent is not None and node.parent is not self.root:
            self.move_cursor(node.parent)

    def action_expand_node(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.allow_expand and not node.is_expanded:
            node.expand()
        elif node.children:
            self.move_cursor(node.children[0])

    def action_first(self) -> None:
        self.cursor_line = 0
        self.scroll_home(animate=False)

    def action_last(self) -> None:
        self.cursor_line = self.last_line
        self.scroll_end(animate=False)
