"""fp8 weights with a block scale (`weight_scale_inv`, DeepSeek-V3 style): find the pairs and dequantise them."""

from __future__ import annotations

import torch

from rlsub_tui.checkpoints.checkpoint import Checkpoint

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def block_scales(ckpt: Checkpoint) -> dict[str, str]:
    """fp8 weight name -> its block scale tensor's name, for every fp8 weight stored with one."""
    out = {}
    for name, info in ckpt.tensors.items():
        scale = name + SCALE_SUFFIX
        if info.dtype in FP8 and scale in ckpt.tensors and ckpt.tensors[scale].dtype.is_floating_point:
            out[name] = scale
    return out


def block_size(ckpt: Checkpoint) -> tuple[int, int]:
    q = (ckpt.config() or {}).get("quantization_config")
    size = q.get("weight_block_size") if isinstance(q, dict) else None
    if isinstance(size, list) and len(size) == 2 and all(type(x) is int and x > 0 for x in size):
        return size[0], size[1]
    return DEFAULT_BLOCK


def scale_mismatch(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int]) -> str | None:
    """Why a scale cannot dequantise this weight, or None when its shape fits (one scale per block)."""
    if len(weight_shape) != 2:
        return f"a block scale needs a 2-D weight, not shape {list(weight_shape)}"
    want = tuple(-(-d // b) for d, b in zip(weight_shape, block))
    if tuple(scale_shape) != want:
        return (f"block scale shape {list(scale_shape)} does not fit weight {list(weight_shape)} "
                f"in {block[0]}x{block[1]} blocks (expected {list(want)})")
    return None


def dequantise(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight · scale, each scale covering one block of the weight, in float32."""
    m, n = weight.shape
    full = scale.to(torch.float32).repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]
    return weight.to(torch.float32) * full
