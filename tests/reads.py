"""The three ways the engine reads a tensor of a checkpoint, each checked against the whole tensor a trainer's own
code gathered: in full, its leading rows, and its bytes from an offset (what the staged reads ask for)."""

from __future__ import annotations

import torch


def assert_reads_as(ckpt, name: str, full: torch.Tensor, skip: int) -> None:
    """`ckpt.read` of `name` equals `full`, its leading half of rows equals full's, and its bytes past `skip`."""
    assert torch.equal(ckpt.read(name), full), name
    rows = max(1, full.shape[0] // 2)
    assert torch.equal(ckpt.read(name, rows), full[:rows]), name
    out = torch.empty(ckpt.tensors[name].nbytes - skip, dtype=torch.uint8)
    ckpt.read_bytes(name, out, skip)
    assert torch.equal(out, full.reshape(-1).view(torch.uint8)[skip:]), name
