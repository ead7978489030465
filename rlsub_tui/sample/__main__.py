"""Regenerate the bundled sample: `python -m rlsub_tui.sample --out sample_data` (about 10 minutes on 2 cores)."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from rlsub_tui.sample import task, train
from rlsub_tui.sample.model import LlamaConfig

SEEDS = (1, 2, 3)


def plan(quick: bool) -> dict:
    """Every run the sample holds, with its full configuration (the README reports these)."""
    scale = 0.02 if quick else 1.0

    def steps(n):
        return max(2, int(n * scale))

    runs = {}
    for s in SEEDS:
        runs[f"grpo-lowlr-seed{s}"] = ("grpo", train.GRPOConfig(steps=steps(800), lr=3e-6, seed=s), torch.bfloat16)
    for s in SEEDS:
        runs[f"grpo-highlr-seed{s}"] = ("grpo", train.GRPOConfig(steps=steps(300), lr=1e-5, seed=s), torch.bfloat16)
    runs["sft"] = ("sft", train.SFTConfig(steps=steps(800), lr=3e-6, seed=1), torch.bfloat16)
    return {
        "model": LlamaConfig(),
        "pretrain": train.PretrainConfig(steps=steps(450)),
        "runs": runs,
    }


def _train_one(args) -> tuple[str, float, float]:
    name, kind, cfg, out, model_cfg = args
    torch.set_num_threads(1)  # one thread per process: deterministic and parallel across runs
    tr, te = task.split_pairs()
    t0 = time.perf_counter()
    if kind == "grpo":
        model = train.grpo(model_cfg, out / "base", cfg, tr, name)
    else:
        model = train.sft(model_cfg, out / "base", cfg, tr, name)
    train.save_checkpoint(model, out / name, torch.bfloat16)
    if name == "grpo-lowlr-seed1":
        train.save_checkpoint(model, out / "fp32-grpo-lowlr-seed1", torch.float32)
    return name, train.accuracy(model, te), time.perf_counter() - t0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checksums(out: Path) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
                   and p.name != "SHA256SUMS.json")
    sums = {str(p.relative_to(out)): sha256(p) for p in files}
    (out / "SHA256SUMS.json").write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")


def remeasure(out: Path) -> int:
    """Measure an existing sample again (after the engine gained figures) without retraining it."""
    from rlsub_tui.sample.report import measure, render_readme

    record = json.loads((out / "training.json").read_text())
    record["measurements"] = measure(out)
    (out / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(render_readme(record))
    write_checksums(out)
    print(f"measured {out.resolve()} again: training.json, README.md, SHA256SUMS.json rewritten", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsub_tui.sample", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("sample_data"))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (for tests)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--remeasure", action="store_true",
                   help="no training: measure the checkpoints already in --out again and rewrite "
                        "training.json's measurements, README.md and SHA256SUMS.json")
    args = p.parse_args(argv)
    out: Path = args.out
    if args.remeasure:
        return remeasure(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = plan(args.quick)
    model_cfg: LlamaConfig = spec["model"]
    start = time.perf_counter()
    torch.set_num_threads(1)
    tr, te = task.split_pairs()
    print(f"[1/3] base: pretraining a {sum(1 for _ in range(model_cfg.num_hidden_layers))}-layer Llama "
          f"(hidden {model_cfg.hidden_size}) on reversed-digit addition", flush=True)
    base = train.pretrain(model_cfg, spec["pretrain"], tr)
    train.save_checkpoint(base, out / "base", torch.bfloat16)
    base = train.load_model(out / "base", model_cfg)  # what every run starts from: the bf16 base
    # the same values in fp32, to compare the fp32 run against without rounding it to bf16
    train.save_checkpoint(base, out / "base-fp32", torch.float32)
    accuracy = {"base": train.accuracy(base, te)}
    print(f"      base held-out accuracy {accuracy['base']:.3f}", flush=True)
    print(f"[2/3] {len(spec['runs'])} fine-tuning runs on {args.jobs} process(es)", flush=True)
    jobs = [(name, kind, cfg, out, model_cfg) for name, (kind, cfg, _) in spec["runs"].items()]
    seconds = {}
    # spawn, not fork: a forked child of a process that has used CUDA (the test suite on a GPU box) or
    # holds threads may fail or hang
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, acc, secs in pool.map(_train_one, jobs):
            accuracy[name] = acc
            seconds[name] = secs
            print(f"      {name:<20} held-out accuracy {acc:.3f}  ({secs:.0f}s)", flush=True)
    accuracy["fp32-grpo-lowlr-seed1"] = accuracy["grpo-lowlr-seed1"]
    print("[3/3] measuring with rlsub-tui's own engine", flush=True)
    from rlsub_tui.sample.report import measure

    measurements = measure(out)
    from rlsub_tui.sample.report import render_readme

    record = {
        "model": asdict(model_cfg),
        "task": "two-digit addition a+b (0<=a,b<100), answer digits reversed, 80/20 train/held-out split",
        "held_out_prompts": len(te),
        "pretrain": asdict(spec["pretrain"]),
        "runs": {name: {"kind": kind, "config": asdict(cfg)} for name, (kind, cfg, _) in spec["runs"].items()},
        "held_out_accuracy": accuracy,
        "measurements": measurements,
        "quick": args.quick,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(render_readme(record))
    write_checksums(out)
    print(f"done in {time.perf_counter() - start:.0f}s -> {out.resolve()} "
          f"(run times: {', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
