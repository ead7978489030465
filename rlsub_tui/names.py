"""Tensor names: matching across checkpoints and placing each tensor in layers, submodules and types."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Wrappers that trainers add or strip; names that differ only by these are the same tensor.
PREFIXES = ("base_model.model.", "module.", "_orig_mod.", "model.")
LAYER = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")


def canonical(name: str) -> str:
    """The name with wrapper prefixes removed, used to match tensors across checkpoints."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


@dataclass(frozen=True)
class Placement:
    """Where a tensor sits in the model: its layer (if any), submodule and type across layers."""

    layer: int | None
    layer_path: str | None  # e.g. "model.layers.3"
    submodule: str | None  # e.g. "self_attn" inside the layer; None for a tensor directly in the layer
    tensor_type: str  # the name with the layer index removed, e.g. "self_attn.q_proj.weight"
    leaf: str  # the last components: "q_proj.weight"
    is_norm: bool


def place(name: str) -> Placement:
    lowered = name.lower()
    is_norm = "norm" in lowered or "ln_" in lowered
    m = LAYER.match(name)
    if m is None:
        return Placement(None, None, None, canonical(name), name, is_norm)
    rest = m.group("rest")
    parts = rest.split(".")
    submodule = parts[0] if len(parts) > 2 else None
    leaf = ".".join(parts[1:]) if submodule else rest
    return Placement(
        int(m.group("index")),
        f"{m.group('stack')}.{m.group('index')}",
        submodule,
        rest,
        leaf,
        is_norm,
    )


def tensor_kind(tensor_type: str) -> str:
    """A coarse family for a tensor type: attention, mlp, norm, embedding, head or other."""
    t = tensor_type.lower()
    if "norm" in t or t.startswith("ln_"):
        return "norm"
    if "embed" in t or t.startswith("wte") or t.startswith("wpe"):
        return "embedding"
    if "lm_head" in t:
        return "head"
    if "attn" in t or "attention" in t:
        return "attention"
    if "mlp" in t or "ffn" in t or "feed_forward" in t or "experts" in t:
        return "mlp"
    return "other"
