"""Tied tensors: one tensor stored under two names (tied embeddings) is compared and counted once."""

from __future__ import annotations

import torch

from rlsub_tui.checkpoints.checkpoint import Checkpoint

HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
              "tok_embeddings.weight")


def find_tied(ckpt: Checkpoint) -> dict[str, str]:
    """alias -> primary name for every tensor stored under a second name.

    A pickle keeps shared storage, so two names on one storage (same offset, shape and strides) are
    one tensor; the name saved first is the primary, as `named_parameters()` reports it. Safetensors
    cannot share storage, so there an output head is an alias of the input embedding only when the
    config ties word embeddings (`tie_word_embeddings`, true unless set false, as in transformers)
    and the two hold identical bytes. A PEFT adapter run keeps the base's ties where it changes neither name.
    """
    if ckpt.layout == "peft":
        adapter = ckpt.reader
        return {a: p for a, p in find_tied(adapter.base).items() if adapter.unchanged(a) and adapter.unchanged(p)}
    if ckpt.layout != "safetensors":
        return _shared_storage(ckpt)
    return _tied_by_config(ckpt)


def _shared_storage(ckpt: Checkpoint) -> dict[str, str]:
    first: dict[tuple, str] = {}
    aliases = {}
    for name in ckpt.tensors:
        key = ckpt.storage_key(name)
        if key is None or ckpt.tensors[name].numel == 0:
            continue
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _ends_with(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _tied_by_config(ckpt: Checkpoint) -> dict[str, str]:
    config = ckpt.config()
    if config is None or config.get("tie_word_embeddings", True) is not True:
        return {}
    heads = [n for n in ckpt.tensors if _ends_with(n, HEADS)]
    embeds = [n for n in ckpt.tensors if _ends_with(n, EMBEDDINGS)]
    aliases = {}
    for head in heads:
        for embed in embeds:
            h, e = ckpt.tensors[head], ckpt.tensors[embed]
            if h.shape == e.shape and h.dtype == e.dtype and torch.equal(ckpt.read(head), ckpt.read(embed)):
                aliases[head] = embed
                break
    return aliases


def tied_note(alias: str, primary: str, where: str) -> str:
    return (f"{alias} is the same tensor as {primary} in {where} (tied); "
            f"compared and counted once, as {primary}.")
