"""Tensor names: matching across checkpoints and placing each tensor in layers, submodules and types."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Wrappers that trainers add or strip; names that differ only by these are the same tensor.
PREFIXES = ("base_model.model.", "module.", "_orig_mod.", "model.")
# Wrapper modules that FSDP1 and activation checkpointing put anywhere in a name (model.layers.0._fsdp_wrapped_module.
# mlp...): the same tensor without them.
WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
LAYER = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")


def canonical(name: str) -> str:
    """The name with wrapper prefixes removed, used to match tensors across checkpoints."""
    if any(w in name for w in WRAPPERS):
        name = ".".join(part for part in name.split(".") if part not in WRAPPERS)
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


def place(name: str) -> Placement:
    m = LAYER.match(name)
    if m is None:
        return Placement(None, None, None, canonical(name), name)
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
    )


HEAD_PARTS = {"lm_head", "embed_out"}  # embed_out: GPT-NeoX/Pythia's output head
EMBEDDING_PARTS = {"wte", "wpe", "word_embeddings"}  # GPT-2 token/position, Falcon/BLOOM tokens
MLP_PARTS = {"fc1", "fc2", "c_fc", "fc_in", "fc_out"}  # OPT/Phi, GPT-2, GPT-J
MLP_WORDS = ("mlp", "ffn", "feed_forward", "expert", "moe", "router")  # + Mixtral/Qwen-MoE experts, routers


def tensor_kind(tensor_type: str) -> str:
    """A coarse family for a tensor type: attention, mlp, norm, embedding, head or other.

    Decided per dotted component, in this order, so that one rule covers the common families
    (Llama/Qwen/Mistral, GPT-2, GPT-NeoX, OPT, Falcon, Phi, Gemma, Mixtral and Qwen-MoE experts).
    """
    parts = tensor_type.lower().split(".")

    def has(*words: str) -> bool:
        return any(w in p for p in parts for w in words)

    if has("norm") or any(p == "ln" or p.startswith("ln_") for p in parts):
        return "norm"
    if HEAD_PARTS.intersection(parts):
        return "head"
    if has("embed") or EMBEDDING_PARTS.intersection(parts):
        return "embedding"
    if has("attn", "attention"):
        return "attention"
    if has(*MLP_WORDS) or MLP_PARTS.intersection(parts):
        return "mlp"
    return "other"
