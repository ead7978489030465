"""What the explorer shows, without Textual: the node hierarchy, the children table and each chart's data.

The UI only renders these; the tests and the CSV export use the same functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from rlsub_tui.checkpoints.names import place, tensor_kind

KIND_ORDER = ["embedding", "attention", "mlp", "norm", "head", "other"]


Level = Literal["group", "model", "layer", "submodule", "kind", "type", "tensor"]  # a tree node's place


@dataclass
class Node:
    """One entry of the tree: a group of tensors (or one tensor) and its children."""

    key: str
    label: str
    tensors: list[str]
    children: list["Node"] = field(default_factory=list)
    is_tensor: bool = False
    level: Level = "group"

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


def _layer_sort_key(path: str):
    tail = path.rsplit(".", 1)[-1]
    return (0, int(tail)) if tail.isdigit() else (1, path)


def _group(groups: dict[str, Node], key: str, label: str, level: Level, parent: Node | None) -> Node:
    """The group node of this key, created (and attached to its parent) on first use."""
    node = groups.get(key)
    if node is None:
        node = groups[key] = Node(key, label, [], level=level)
        if parent is not None:
            parent.children.append(node)
    return node


def build_tree(names: list[str], model_label: str = "model") -> list[Node]:
    """Two roots: the model by structure (layers → submodules → tensors), and the same tensors by type."""
    model = Node("model", model_label, list(names), level="model")
    groups: dict[str, Node] = {}
    top_level: list[Node] = []
    for name in names:
        p = place(name)
        leaf = Node(f"tensor:{name}", p.leaf if p.layer_path else name, [name], is_tensor=True, level="tensor")
        if p.layer_path is None:
            top_level.append(leaf)
            continue
        layer = _group(groups, p.layer_path, f"layer {p.layer}", "layer", None)
        layer.tensors.append(name)
        parent = layer
        if p.submodule:
            parent = _group(groups, f"{p.layer_path}.{p.submodule}", p.submodule, "submodule", layer)
            parent.tensors.append(name)
        parent.children.append(leaf)
    layers = sorted((g for g in groups.values() if g.level == "layer"), key=lambda g: _layer_sort_key(g.key))
    first = [n for n in top_level if tensor_kind(n.label) == "embedding"]
    last = [n for n in top_level if n not in first]
    model.children = first + layers + last

    by_type = Node("by-type", "by type", list(names), level="model")
    for name in names:
        p = place(name)
        kind = tensor_kind(p.tensor_type)
        kn = _group(groups, f"kind:{kind}", f"all {kind}", "kind", None)
        kn.tensors.append(name)
        tn = _group(groups, f"type:{p.tensor_type}", p.tensor_type, "type", kn)
        tn.tensors.append(name)
        label = f"layer {p.layer}" if p.layer is not None else name
        tn.children.append(Node(f"{tn.key}/{name}", label, [name], is_tensor=True, level="tensor"))
    by_type.children = [groups[f"kind:{k}"] for k in KIND_ORDER if f"kind:{k}" in groups]
    return [model, by_type]


def find(roots: list[Node], key: str) -> Node | None:
    for r in roots:
        for n in r.walk():
            if n.key == key:
                return n
    return None


def filter_tree(roots: list[Node], text: str) -> list[Node]:
    """Keep tensors whose name contains `text` (case-insensitive) and the groups above them."""
    text = text.lower().strip()
    if not text:
        return roots

    def keep(node: Node) -> Node | None:
        if node.is_tensor:
            return node if any(text in t.lower() for t in node.tensors) else None
        kids = [k for k in (keep(c) for c in node.children) if k is not None]
        if not kids:
            return None
        tensors = [t for k in kids for t in k.tensors]
        return Node(node.key, node.label, tensors, kids, level=node.level)

    kept = []
    for root in roots:
        k = keep(root)
        if k is not None:  # the root says that its numbers pool only the matching tensors
            name = re.sub(r" \(\d+ tensors\)$", "", root.label)
            k.label = f"{name} (filter '{text}': {len(k.tensors)} of {len(root.tensors)} tensors)"
            kept.append(k)
    return kept


# --------------------------------------------------------------------------------------------------
# The children table


# --------------------------------------------------------------------------------------------------
# Chart data: each returns a dict with x, series {label: ys}, and axis titles; small enough to plot.


