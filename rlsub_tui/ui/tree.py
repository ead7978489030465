"""The layer tree: model → layers → submodules → tensors, and the same tensors by type."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from rlsub_tui.explore import Node
from rlsub_tui.formatting import pct
from rlsub_tui.results import AnalysisResult

BAR_WIDTH = 6


def sparsity_bar(sparsity: float) -> str:
    """A small bar whose filled part is the *updated* share, so dense nodes stand out."""
    if sparsity != sparsity:  # NaN: not computed yet
        return "·" * BAR_WIDTH
    filled = round((1 - sparsity) * BAR_WIDTH)
    return "█" * filled + "░" * (BAR_WIDTH - filled)


def node_label(node: Node, result: AnalysisResult | None) -> Text:
    """Sparsity and bar first, so they stay visible in a narrow pane; then the name (a Text, never markup)."""
    text = Text()
    s = result.stats(node.tensors) if result is not None else None
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
        Binding("j", "cursor_down", "Down", show=False, id="tree.down"),
        Binding("k", "cursor_up", "Up", show=False, id="tree.up"),
        Binding("h,left", "collapse_or_parent", "Collapse", show=False, id="tree.collapse"),
        Binding("l,right", "expand_node", "Expand", show=False, id="tree.expand"),
        Binding("g,home", "first", "Top", show=False, id="tree.top"),
        Binding("G,end", "last", "Bottom", show=False, id="tree.bottom"),
    ]

    def __init__(self, **kw):
        super().__init__("checkpoints", **kw)
        self.show_root = False
        self.guide_depth = 2
        self._roots: list[Node] = []

    def populate(self, roots: list[Node], result: AnalysisResult | None, expand_first: bool = True) -> None:
        self.clear()
        self._roots = roots
        for i, r in enumerate(roots):
            self._add(self.root, r, result, expand=(i == 0 and expand_first))
        self.root.expand()
        if roots:
            self.cursor_line = 0

    def _add(self, parent: TreeNode, node: Node, result, expand=False) -> None:
        if node.children:
            t = parent.add(node_label(node, result), data=node, expand=expand)
            for c in node.children:
                self._add(t, c, result)
        else:
            parent.add_leaf(node_label(node, result), data=node)

    def refresh_labels(self, result: AnalysisResult) -> None:
        def visit(tn: TreeNode):
            for child in tn.children:
                if child.data is not None:
                    child.set_label(node_label(child.data, result))
                visit(child)
        visit(self.root)

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
