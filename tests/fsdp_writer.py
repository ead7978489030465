"""verl-style FSDP checkpoints written by torch itself on CPU, for tests/test_fsdp_shards.py.

`python tests/fsdp_writer.py OUT` writes, from a tiny Llama whose sizes do not divide evenly over two ranks:
  base/                                   the base, a bf16 Hugging Face export
  runs/seedS/global_step_T/actor/         per seed S in 1-3 and step T in 10, 20: each rank's
                                          torch.save(model.state_dict()) under FSDP2 (fully_shard, gloo, W = 2),
                                          fsdp_config.json, huggingface/config.json
  export/seedS/global_step_T/             the same fp32 weights gathered with DTensor.full_tensor(), as safetensors
  runs/seed1/global_step_20/actor/huggingface/model.safetensors   a bf16 copy (verl's hf_model), which the shards win over
  w1/actor/                               seed 1's last step as W = 1 plain tensors
  mesh2d/actor/                           seed 2's last step on a 2 x 2 ("ddp", "fsdp") mesh (W = 4)
  bad/keys/, bad/shape/, bad/partial/     seed 1's last step with rank 1 lacking a tensor / holding a shard of the
                                          wrong shape for its global shape / a tensor placed Partial()
Seed 3's names carry FSDP1's _fsdp_wrapped_module wrappers. Gloo workers are forked: a few seconds in all.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn

from rlsub_tui.sample.model import LlamaConfig, TinyLlama

CONFIG = LlamaConfig(vocab_size=21, hidden_size=48, intermediate_size=75, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
SEEDS = (1, 2, 3)
STEPS = (10, 20)
WORLD = 2


def new_model(config: LlamaConfig = CONFIG, logit_scale: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = TinyLlama(config)
    if logit_scale:  # one row: rank 1's shard is empty
        model.register_parameter("logit_scale", nn.Parameter(torch.ones(1)))
    return model


def base_state(config: LlamaConfig = CONFIG) -> dict[str, torch.Tensor]:
    """The base as the actor holds it: bf16 values (a bf16 Hugging Face base) in fp32."""
    return {n: p.detach().to(torch.bfloat16).float() for n, p in new_model(config).named_parameters()}


def run_state(base: dict[str, torch.Tensor], seed: int, step: int) -> dict[str, torch.Tensor]:
    """Sparse fp32 updates: positions shared by all seeds and the seed's own, half of them smaller than half a bf16
    ULP of the weight (true updates bf16 hides); step 10 holds the first half of step 20's positions."""
    out = {}
    for i, (name, w) in enumerate(base.items()):
        shared = torch.Generator().manual_seed(1000 + i)
        own = torch.Generator().manual_seed(100 * seed + i)
        where = (torch.rand(w.shape, generator=shared) < 0.08) | (torch.rand(w.shape, generator=own) < 0.06)
        if step < STEPS[-1]:
            where &= torch.rand(w.shape, generator=own) < 0.5
        sign = torch.where(torch.rand(w.shape, generator=own) < 0.5, -1.0, 1.0)
        hidden = torch.rand(w.shape, generator=own) < 0.5
        size = torch.where(hidden, w.abs() * 2.0 ** -10, w.abs() * 2.0 ** -5 + 1e-4)
        out[name] = torch.where(where, w + sign * size, w)
    return out


def wrapped(name: str) -> str:
    """A name as FSDP1's nested wrappers spell it (_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp...)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        parts.insert(3, "_fsdp_wrapped_module")
    return ".".join(["_fsdp_wrapped_module"] + parts)


def hf_config(dtype: str, config: LlamaConfig = CONFIG) -> str:
    return json.dumps(config.to_hf(bos=18, eos=19, pad=20, dtype=dtype), indent=2)


def save_hf(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype, config: LlamaConfig = CONFIG) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.to(dtype).contiguous() for n, t in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(hf_config(str(dtype).removeprefix("torch."), config))


def sharded(state: dict[str, torch.Tensor], mesh, config: LlamaConfig = CONFIG) -> dict:
    """`model.state_dict()` of the model holding `state`, sharded as verl shards it (each layer, then the root)."""
    from torch.distributed.fsdp import fully_shard

    model = new_model(config, logit_scale="logit_scale" in state)
    model.load_state_dict(state)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model.state_dict()


def save_actor(sd: dict, actor: Path, rank: int, world: int, config: LlamaConfig = CONFIG) -> None:
    actor.mkdir(parents=True, exist_ok=True)
    torch.save(sd, actor / f"model_world_size_{world}_rank_{rank}.pt")
    if rank == 0:
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}, indent=4))
        (actor / "huggingface").mkdir(exist_ok=True)
        (actor / "huggingface" / "config.json").write_text(hf_config("float32", config))


def one_dimensional(rank: int, port: int, out: Path, states: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    _join(rank, WORLD, port)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    for (seed, step), state in states.items():
        sd = sharded(state, mesh)
        full = {n: t.full_tensor() for n, t in sd.items()}  # torch's own gather: the independent copy
        if seed == 3:
            sd = {wrapped(n): t for n, t in sd.items()}
        save_actor(sd, out / "runs" / f"seed{seed}" / f"global_step_{step}" / "actor", rank, WORLD)
        if rank == 0:
            save_hf(full, out / "export" / f"seed{seed}" / f"global_step_{step}", torch.float32)
        if (seed, step) == (1, STEPS[-1]):
            if rank == 0:
                save_hf(full, out / "runs" / "seed1" / f"global_step_{step}" / "actor" / "huggingface", torch.bfloat16)
            keys = dict(sd)
            if rank == 1:
                del keys["lm_head.weight"]
            save_actor(keys, out / "bad" / "keys", rank, WORLD)
            bad = dict(sd)
            name = "model.layers.0.mlp.up_proj.weight"
            local = sd[name].to_local()
            bad[name] = DTensor.from_local(local[:-1] if rank == 1 else local, mesh, [Shard(0)],
                                           shape=sd[name].shape, stride=sd[name].stride(), run_check=False)
            save_actor(bad, out / "bad" / "shape", rank, WORLD)
            bad[name] = DTensor.from_local(local, mesh, [Partial()], run_check=False)
            save_actor(bad, out / "bad" / "partial", rank, WORLD)
    dist.destroy_process_group()


def two_dimensional(rank: int, port: int, out: Path, state: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    _join(rank, 4, port)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ddp", "fsdp"))
    save_actor(sharded(state, mesh), out / "mesh2d" / "actor", rank, 4)
    dist.destroy_process_group()


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: Path) -> None:
    # imported once here rather than in every forked worker (fully_shard's first call imports torch._dynamo: 3 s)
    import torch._dynamo  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    base = base_state()
    save_hf(base, out / "base", torch.bfloat16)
    states = {(seed, step): run_state(base, seed, step) for seed in SEEDS for step in STEPS}
    mp.start_processes(one_dimensional, args=(free_port(), out, states), nprocs=WORLD, start_method="fork")
    mp.start_processes(two_dimensional, args=(free_port(), out, states[(2, STEPS[-1])]), nprocs=4,
                       start_method="fork")
    w1 = out / "w1" / "actor"
    w1.mkdir(parents=True)
    torch.save(states[(1, STEPS[-1])], w1 / "model_world_size_1_rank_0.pt")
    (w1 / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
