"""DeepSpeed ZeRO checkpoints written by DeepSpeed itself on CPU (DS_ACCELERATOR=cpu, gloo, W = 2), for
tests/test_zero_partitions.py.

`python tests/zero_writer.py OUT` writes, from a tiny transformers LlamaForCausalLM whose sizes do not divide evenly
over two ranks:
  base/                               the initial weights, a bf16 Hugging Face export (what bf16 training starts from)
  runs/zS/seedN/                      engine.save_checkpoint after two steps of torch AdamW: `latest` and
                                      global_step2/, for ZeRO stages 2 and 3 (bf16) with seeds 1-3 and for stage 1:
                                      seed 1 fp32, seed 2 bf16 (DeepSpeed's ZeRO-1 optimizer), seed 3 bf16 with
                                      gradients accumulated in fp32, which selects DeepSpeed's BF16_Optimizer (its
                                      files record no zero_stage, and zero_to_fp32 cannot read them)
                                      seed 3 trains with model.norm.weight frozen (frozen_param_shapes)
  export/zS/seedN/model.safetensors   zero_to_fp32's get_fp32_state_dict_from_zero_checkpoint of the same save (none
                                      for the BF16_Optimizer save)
Nine engines on two spawned gloo workers: about a minute.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

WORLD = 2
# (stage, seed, precision); "bf16-fp32-grads": bf16 weights, fp32 gradient accumulation
RUNS = [(1, 1, "fp32"), (1, 2, "bf16"), (1, 3, "bf16-fp32-grads"), (2, 1, "bf16"), (2, 2, "bf16"), (2, 3, "bf16"),
        (3, 1, "bf16"), (3, 2, "bf16"), (3, 3, "bf16")]
UNEXPORTED = "bf16-fp32-grads"  # DeepSpeed's BF16_Optimizer, whose saves zero_to_fp32 refuses
FROZEN_SEED = 3
STEPS = 2


# a tiny Llama whose sizes do not divide evenly over two ranks
SIZES = dict(vocab_size=21, hidden_size=45, intermediate_size=75, num_hidden_layers=2, head_dim=12,
             num_attention_heads=3, num_key_value_heads=1)


def new_model(dtype: torch.dtype = torch.float32, sizes: dict = SIZES):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes, max_position_embeddings=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # the bf16 base's values, so that fp32 and bf16 training start from the same weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model.to(dtype)


def ds_config(stage: int, precision: str) -> dict:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": precision != "fp32"},
              # buckets of a few million elements: the defaults (5e8) allocate gigabytes per rank at real widths
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                    "reduce_bucket_size": 5e6, "allgather_bucket_size": 5e6,
                                    "stage3_prefetch_bucket_size": 5e6, "stage3_max_live_parameters": 1e7,
                                    "stage3_max_reuse_distance": 1e7},
              "wall_clock_breakdown": False}
    if precision == "bf16-fp32-grads":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def train_and_save(stage: int, seed: int, precision: str, folder: Path, frozen: bool = False,
                   sizes: dict = SIZES) -> None:
    import deepspeed

    model = new_model(sizes=sizes)
    if frozen:
        model.model.norm.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, precision))
    data = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        ids = torch.randint(0, sizes["vocab_size"], (2, 8), generator=data)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(folder))
    engine.destroy()


def worker(rank: int, port: int, out: Path, world: int, runs: list, sizes: dict, frozen_seed: int | None) -> None:
    join(rank, port, world)
    for stage, seed, precision in runs:
        train_and_save(stage, seed, precision, out / "runs" / f"z{stage}" / f"seed{seed}", frozen=seed == frozen_seed,
                       sizes=sizes)


def join(rank: int, port: int, world: int) -> None:
    """This process as rank `rank` of `world` DeepSpeed ranks on gloo."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def export(ckpt: Path, folder: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in state.items()}, str(folder / "model.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(out: Path, world: int = WORLD, runs: list = RUNS, sizes: dict = SIZES,
          frozen_seed: int | None = FROZEN_SEED) -> None:
    """The base, `runs` saved by `world` ranks under runs/zS/seedN/, and their zero_to_fp32 exports under export/."""
    model = new_model(torch.bfloat16, sizes)
    (out / "base").mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(out / "base" / "model.safetensors"))
    model.config.torch_dtype = torch.bfloat16
    model.config.to_json_file(str(out / "base" / "config.json"))
    del model
    mp.start_processes(worker, args=(free_port(), out, world, runs, sizes, frozen_seed), nprocs=world,
                       start_method="spawn")
    for stage, seed, precision in runs:
        if precision == UNEXPORTED:
            continue
        export(out / "runs" / f"z{stage}" / f"seed{seed}", out / "export" / f"z{stage}" / f"seed{seed}")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
