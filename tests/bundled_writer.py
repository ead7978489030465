"""The bundled base's GRPO seeds as each RL trainer would store them, written by the trainers' own libraries on CPU,
for tests/test_bundled_layouts.py.

`python tests/bundled_writer.py OUT` takes three runs of the bundled sample (sample_data/): the fp32 GRPO run
fp32-grpo-lowlr-seed1 and the last checkpoints of grpo-lowlr-seed2 and -seed3 (bf16 values held as fp32 masters, as a
trainer with fp32 masters would hold them), and writes each as
  export/seedS/model.safetensors   the fp32 weights as a Hugging Face export, config.json beside them
  fsdp/seedS/actor/                torch's FSDP2 (fully_shard on a 2-rank gloo mesh), each rank's state_dict saved as
                                   verl saves it
  dcp/seedS/pytorch_model_fsdp_0/  torch.distributed.checkpoint.save of {"model": state}, as accelerate lays it out
  zero/seedS/                      DeepSpeed ZeRO-3 on 2 gloo ranks (fp32: a bf16 engine would round the masters it
                                   starts from to bf16) initialised from the weights
                                   and saved (save_checkpoint) before any step: the masters are the weights
About 30 s, most of it DeepSpeed starting on two spawned ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
RUNS = {1: "fp32-grpo-lowlr-seed1", 2: "grpo-lowlr-seed2/checkpoint-800", 3: "grpo-lowlr-seed3/checkpoint-800"}
WORLD = 2


def states() -> dict[int, dict[str, torch.Tensor]]:
    return {s: {n: t.float() for n, t in load_file(str(SAMPLE / run / "model.safetensors")).items()}
            for s, run in RUNS.items()}


def sample_config():
    from rlsub_tui.sample.model import LlamaConfig

    raw = json.loads((SAMPLE / "base" / "config.json").read_text())
    return LlamaConfig(**{k: raw[k] for k in LlamaConfig.__dataclass_fields__})


def fsdp_rank(rank: int, port: int, out: Path, runs: dict) -> None:
    import torch.distributed as dist
    from fsdp_writer import _join, save_actor, sharded
    from torch.distributed.device_mesh import init_device_mesh

    _join(rank, WORLD, port)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    config = sample_config()
    for seed, state in runs.items():
        save_actor(sharded(state, mesh, config), out / "fsdp" / f"seed{seed}" / "actor", rank, WORLD, config)
    dist.destroy_process_group()


def zero_rank(rank: int, port: int, out: Path, runs: dict) -> None:
    import deepspeed
    from zero_writer import ds_config, join, new_model

    join(rank, port, WORLD)
    raw = json.loads((SAMPLE / "base" / "config.json").read_text())
    sizes = {k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
                                 "num_attention_heads", "num_key_value_heads")}
    for seed, state in runs.items():
        model = new_model(sizes=sizes)
        model.load_state_dict(state)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(3, "fp32"))
        engine.save_checkpoint(str(out / "zero" / f"seed{seed}"))
        engine.destroy()


def main(out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from fsdp_writer import free_port

    runs = states()
    config = json.loads((SAMPLE / "base" / "config.json").read_text())
    for seed, state in runs.items():
        folder = out / "export" / f"seed{seed}"
        folder.mkdir(parents=True)
        save_file({n: t.contiguous() for n, t in state.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}, indent=2))
        dcp.save({"model": state}, checkpoint_id=out / "dcp" / f"seed{seed}" / "pytorch_model_fsdp_0")
    mp.start_processes(fsdp_rank, args=(free_port(), out, runs), nprocs=WORLD, start_method="fork")
    mp.start_processes(zero_rank, args=(free_port(), out, runs), nprocs=WORLD, start_method="spawn")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    main(Path(sys.argv[1]))
