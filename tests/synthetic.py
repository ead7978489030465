"""Small synthetic checkpoints with known updates, written in every layout the loader supports."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_SHAPES = {
    "model.embed_tokens.weight": (64, 32),
    "model.norm.weight": (32,),
    "lm_head.weight": (64, 32),
}
for _i in range(2):
    LLAMA_SHAPES.update({
        f"model.layers.{_i}.input_layernorm.weight": (32,),
        f"model.layers.{_i}.self_attn.q_proj.weight": (32, 32),
        f"model.layers.{_i}.self_attn.k_proj.weight": (16, 32),
        f"model.layers.{_i}.self_attn.v_proj.weight": (16, 32),
        f"model.layers.{_i}.self_attn.o_proj.weight": (32, 32),
        f"model.layers.{_i}.post_attention_layernorm.weight": (32,),
        f"model.layers.{_i}.mlp.gate_proj.weight": (48, 32),
        f"model.layers.{_i}.mlp.up_proj.weight": (48, 32),
        f"model.layers.{_i}.mlp.down_proj.weight": (32, 48),
    })


def base_state(seed: int = 0, dtype=torch.bfloat16, shapes=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or LLAMA_SHAPES
    return {n: (torch.randn(s, generator=g) * 0.05).to(dtype) for n, s in shapes.items()}


def sparse_run(base: dict[str, torch.Tensor], seed: int, density: float = 0.3, scale: float = 1e-2,
               shared: float = 0.5) -> dict[str, torch.Tensor]:
    """A run that moves about `density` of the parameters; `shared` of them come from a seed-independent set."""
    g = torch.Generator().manual_seed(1000 + seed)
    common = torch.Generator().manual_seed(7)
    out = {}
    for name, w in base.items():
        keep_common = torch.rand(w.shape, generator=common) < density
        own = torch.rand(w.shape, generator=g) < density
        pick = torch.where(torch.rand(w.shape, generator=g) < shared, keep_common, own)
        step = torch.randn(w.shape, generator=g) * scale
        out[name] = (w.float() + pick * step).to(w.dtype)
    return out


def save(state: dict[str, torch.Tensor], directory: Path, layout: str = "safetensors", shards: int = 2) -> Path:
    """Write a checkpoint directory: 'safetensors', 'sharded', 'bin', 'bin-sharded' or 'file' (one .safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if layout == "file":
        path = directory / "weights.safetensors"
        save_file(state, str(path))
        return path
    if layout == "safetensors":
        save_file(state, str(directory / "model.safetensors"))
    elif layout == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif layout in ("sharded", "bin-sharded"):
        names = list(state)
        ext = "safetensors" if layout == "sharded" else "bin"
        prefix = "model" if layout == "sharded" else "pytorch_model"
        weight_map = {}
        for s in range(shards):
            part = {n: state[n] for n in names[s::shards]}
            fname = f"{prefix}-{s + 1:05d}-of-{shards:05d}.{ext}"
            if ext == "safetensors":
                save_file(part, str(directory / fname))
            else:
                torch.save(part, directory / fname)
            weight_map.update({n: fname for n in part})
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(layout)
    (directory / "config.json").write_text("{}")
    return directory


def broken_checkpoint(root: Path) -> Path:
    """root/broken: a model.safetensors whose header is not JSON (the explorer and analyze must refuse it)."""
    (root / "broken").mkdir()
    (root / "broken" / "model.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    return root / "broken"
