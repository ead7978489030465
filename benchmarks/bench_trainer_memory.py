"""Peak memory of `rlsub-tui analyze` on what RL trainers write, read directly: verl FSDP rank files and DeepSpeed
ZeRO-2 and ZeRO-3 partitions at Qwen2.5-0.5B widths, over W = 2 and 8 ranks, base + K = 3 seeds, against the same fp32
weights written as a safetensors export, at two depths; prints a table.

    python benchmarks/bench_trainer_memory.py                                 # layers 2 and 4, W = 2 and 8
    python benchmarks/bench_trainer_memory.py --worlds 2 --layouts fsdp,zero3 # a quicker look

The checkpoints are written by the trainers' own libraries on this CPU, as the tests' fixtures are, at other sizes:
tests/fsdp_writer.py (torch's FSDP2 `fully_shard` on a gloo mesh of W processes, each rank's `state_dict()` saved as
verl saves it; sparse fp32 updates of a bf16 base; the export is `DTensor.full_tensor()`) and tests/zero_writer.py
(DeepSpeed on its CPU accelerator, W gloo ranks, bf16 with fp32 masters, two steps of AdamW, `save_checkpoint`; the
export is DeepSpeed's `zero_to_fp32`). They are kept in --work between runs.

The vocabulary is --vocab rows (8192 by default rather than Qwen's 151936, so that eight ranks of DeepSpeed fit in
this machine's 24 GiB): the largest tensor is then an MLP matrix (4864 x 896), the same at every depth. Each analysis
runs in a child process (bench_engine's), `--no-rank --no-cache`: the rank's and the overlaps' working memory do not
depend on the layout. Peak RSS is the process tree's (VmHWM, or the sampled sum with worker processes), which counts
the pages of memory-mapped files that were read.

Columns: the peak RSS of the analysis of the trainer's files and of the export of the same weights; their
difference; the issue's bound, (K + 1) x the largest tensor in fp32 plus one rank file's pickled metadata; and,
per layout and W, the growth of the trainer layout's peak from the smaller depth to the larger (flat: ~0).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import subprocess
import sys
import time
import zipfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

QWEN05_WIDTHS = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
SEEDS = (1, 2, 3)
LAYOUTS = ("fsdp", "zero2", "zero3")


def fsdp_worker(rank: int, port: int, folder: Path, states: dict, config, world: int) -> None:
    import torch
    import torch.distributed as dist
    from fsdp_writer import _join, save_actor, save_hf, sharded
    from torch.distributed.device_mesh import init_device_mesh

    _join(rank, world, port)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    for seed, state in states.items():
        sd = sharded(state, mesh, config)
        full = {n: t.full_tensor() for n, t in sd.items()}
        save_actor(sd, folder / "runs" / f"seed{seed}" / "actor", rank, world, config)
        if rank == 0:
            save_hf(full, folder / "export" / f"seed{seed}", torch.float32, config)
        del sd, full
    dist.destroy_process_group()


def write_fsdp(folder: Path, layers: int, vocab: int, world: int) -> None:
    import torch

    # imported once here rather than in every forked rank (fully_shard's first call imports torch._dynamo)
    import torch._dynamo  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    import torch.multiprocessing as mp
    from fsdp_writer import STEPS, base_state, run_state, save_hf

    from rlsub_tui.sample.model import LlamaConfig

    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=16, **QWEN05_WIDTHS)
    base = base_state(config)
    save_hf(base, folder / "base", torch.bfloat16, config)
    states = {seed: run_state(base, seed, STEPS[-1]) for seed in SEEDS}
    del base
    mp.start_processes(fsdp_worker, args=(free_port(), folder, states, config, world), nprocs=world,
                       start_method="fork")


def write_zero(folder: Path, stage: int, layers: int, vocab: int, world: int) -> None:
    from zero_writer import write

    sizes = dict(vocab_size=vocab, num_hidden_layers=layers, head_dim=64, **QWEN05_WIDTHS)
    write(folder, world=world, runs=[(stage, seed, "bf16") for seed in SEEDS], sizes=sizes, frozen_seed=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def written(work: Path, layout: str, layers: int, vocab: int, world: int) -> Path:
    """The folder of one layout's checkpoints, written in a child process (a writer's ranks and their memory end
    with it) unless an earlier run left them complete."""
    folder = work / f"{layout}-w{world}-l{layers}-v{vocab}"
    if (folder / "complete").exists():
        return folder
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    code = (f"import sys; sys.argv[0] = {str(Path(__file__))!r}; sys.path[:0] = {sys.path[:2]!r}\n"
            f"from bench_trainer_memory import write_fsdp, write_zero\nfrom pathlib import Path\n")
    if layout == "fsdp":
        code += f"write_fsdp(Path({str(folder)!r}), {layers}, {vocab}, {world})\n"
    else:
        code += f"write_zero(Path({str(folder)!r}), {int(layout[-1])}, {layers}, {vocab}, {world})\n"
    env = dict(os.environ, DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"writing {folder.name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    (folder / "complete").write_text(f"{time.perf_counter() - start:.0f} s\n")
    return folder


def runs_of(folder: Path, layout: str) -> tuple[list[Path], list[Path]]:
    """The trainer's checkpoints and their exports, seed by seed."""
    if layout == "fsdp":
        return ([folder / "runs" / f"seed{s}" / "actor" for s in SEEDS],
                [folder / "export" / f"seed{s}" for s in SEEDS])
    stage = layout[-1]
    return ([folder / "runs" / f"z{stage}" / f"seed{s}" for s in SEEDS],
            [folder / "export" / f"z{stage}" / f"seed{s}" for s in SEEDS])


def largest_fp32_bytes(export: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        return max(4 * math.prod(f.get_slice(n).get_shape()) for n in f.keys())


def pickle_bytes(run: Path) -> int:
    """The largest pickled metadata (data.pkl) of one rank file of the run: what one shard's structure costs."""
    most = 0
    for f in run.rglob("*.pt"):
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                most = max([most] + [i.file_size for i in z.infolist() if i.filename.endswith("data.pkl")])
    return most


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,4", help="two depths, comma-separated (default 2,4)")
    p.add_argument("--worlds", default="2,8", help="ranks W, comma-separated (default 2,8)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {', '.join(LAYOUTS)} (default all)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--work", type=Path, default=Path("/tmp/rlsub-bench-trainers"))
    args = p.parse_args()
    from bench_engine import ours

    depths = [int(x) for x in args.layers.split(",")]
    worlds = [int(x) for x in args.worlds.split(",")]
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        p.error(f"unknown layout(s): {', '.join(sorted(unknown))}")
    k = len(SEEDS)
    print(f"# bench_trainer_memory · {date.today()} · {platform.node()} · {os.cpu_count()} CPUs · K = {k}, "
          f"vocab {args.vocab}, Qwen2.5-0.5B widths\n")
    print("| layout | W | layers | write s | trainer's files: peak RSS MB (wall s) | export: peak RSS MB (wall s) "
          "| difference MB | bound MB: (K+1) x largest + metadata |")
    print("|---|---|---|---|---|---|---|---|")
    peaks: dict[tuple[str, int], list[float]] = {}
    for layout in layouts:
        for world in worlds:
            for layers in depths:
                folder = written(args.work, layout, layers, args.vocab, world)
                runs, exports = runs_of(folder, layout)
                trainer = ours([folder / "base", *runs], folder / "out-trainer", ["--no-rank", "--workers", "1"])
                export = ours([folder / "base", *exports], folder / "out-export", ["--no-rank", "--workers", "1"])
                bound = (k + 1) * largest_fp32_bytes(exports[0]) + pickle_bytes(runs[0])
                peaks.setdefault((layout, world), []).append(trainer["rss_mb"])
                print(f"| {layout} | {world} | {layers} | {(folder / 'complete').read_text().strip()} "
                      f"| {trainer['rss_mb']:.0f} ({trainer['wall']:.1f}) | {export['rss_mb']:.0f} ({export['wall']:.1f}) "
                      f"| {trainer['rss_mb'] - export['rss_mb']:+.0f} | {bound / 2**20:.0f} |", flush=True)
    if len(depths) > 1:
        print(f"\nGrowth of the trainer layout's peak RSS from {depths[0]} to {depths[-1]} layers:")
        for (layout, world), got in peaks.items():
            print(f"- {layout}, W = {world}: {got[0]:.0f} -> {got[-1]:.0f} MB ({100 * (got[-1] / got[0] - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
