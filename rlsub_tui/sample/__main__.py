"""Regenerate the bundled sample: `python -m rlsub_tui.sample --out sample_data [--base sample_data/base]`."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from rlsub_tui.sample import task, train
from rlsub_tui.sample.model import LlamaConfig
from rlsub_tui.sample.runs import train_run

SEEDS = (1, 2, 3)


def plan(quick: bool) -> dict:
    """Every run the sample holds, with its full configuration (the README reports these)."""
    scale = 0.02 if quick else 1.0

    def steps(n):
        return max(2, int(n * scale))

    runs = {}
    for s in SEEDS:  # timelines: checkpoint-STEP folders, the last one the run's final weights
        runs[f"grpo-lowlr-seed{s}"] = ("grpo", train.GRPOConfig(steps=steps(800), lr=3e-6, seed=s,
                                                                snapshots=(steps(200), steps(500))), torch.bfloat16)
    for s in SEEDS:
        runs[f"grpo-highlr-seed{s}"] = ("grpo", train.GRPOConfig(steps=steps(300), lr=1e-5, seed=s), torch.bfloat16)
    # GRPO takes two optimiser steps per batch (1600 for 800 batches, fewer where a batch's groups all
    # got one reward): SFT gets as many optimiser steps, so that "SFT is sparser" is not about step counts
    runs["sft"] = ("sft", train.SFTConfig(steps=steps(1600), lr=3e-6, seed=1), torch.bfloat16)
    return {
        "model": LlamaConfig(),
        "pretrain": train.PretrainConfig(steps=steps(450)),
        "runs": runs,
    }


def copy_base(source: Path, target: Path) -> None:
    """The given bf16 base as OUT/base, unchanged (nothing to do when it is already there)."""
    if not (source / "model.safetensors").is_file():
        raise SystemExit(f"--base {source}: no model.safetensors there; give the folder of a bf16 base such as "
                         "sample_data/base.")
    if source.resolve() == target.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(source / name, target / name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checksums(out: Path) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
                   and p.name != "SHA256SUMS.json")
    sums = {str(p.relative_to(out)): sha256(p) for p in files}
    (out / "SHA256SUMS.json").write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")


def remeasure(out: Path) -> int:
    """Measure an existing sample again (after the engine gained figures) without retraining it."""
    from rlsub_tui.sample.report import measure, measure_transplant, render_readme

    record = json.loads((out / "training.json").read_text())
    record["measurements"] = measure(out)
    tr, te = task.split_pairs()
    record["measurements"]["transplant"] = measure_transplant(out, LlamaConfig(), te)
    (out / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(render_readme(record))
    write_checksums(out)
    print(f"measured {out.resolve()} again: training.json, README.md, SHA256SUMS.json rewritten", flush=True)
    return 0


def main(argv=None) -> int:
    # Over 60 lines on purpose: the generator's steps in the order they run (options, base, runs, measuring,
    # files), each a call or two; splitting them would only pass the same dozen values around.
    p = argparse.ArgumentParser(prog="python -m rlsub_tui.sample", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("sample_data"))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (for tests)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--base", type=Path, metavar="DIR",
                   help="no pretraining: start every run from this bf16 base (e.g. the committed sample_data/base), "
                        "copied to OUT/base byte for byte; the base's training is not reproducible across machines")
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
    if args.base is not None:
        print(f"[1/3] base: {args.base} (not retrained)", flush=True)
        copy_base(args.base, out / "base")
    else:
        print(f"[1/3] base: pretraining a {sum(1 for _ in range(model_cfg.num_hidden_layers))}-layer Llama "
              f"(hidden {model_cfg.hidden_size}) on reversed-digit addition", flush=True)
        train.save_checkpoint(train.pretrain(model_cfg, spec["pretrain"], tr), out / "base", torch.bfloat16)
    base = train.load_model(out / "base", model_cfg)  # what every run starts from: the bf16 base
    # the same values in fp32, to compare the fp32 run against without rounding it to bf16
    train.save_checkpoint(base, out / "base-fp32", torch.float32)
    accuracy = {"base": train.accuracy(base, te)}
    print(f"      base held-out accuracy {accuracy['base']:.3f}", flush=True)
    print(f"[2/3] {len(spec['runs'])} fine-tuning runs on {args.jobs} process(es)", flush=True)
    # longest first (an SFT step costs about a quarter of a GRPO step), so no long run starts last
    jobs = sorted(((name, kind, cfg, out, model_cfg) for name, (kind, cfg, _) in spec["runs"].items()),
                  key=lambda job: -job[2].steps * (1 if job[1] == "grpo" else 0.25))
    seconds, optimizer_steps = {}, {}
    # spawn, not fork: a forked child of a process that has used CUDA (the test suite on a GPU box) or
    # holds threads may fail or hang; the workers' function lives in runs.py because a spawned child
    # cannot import a package's __main__ (`python -m rlsub_tui.sample` failed here)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, acc, secs, updates in pool.map(train_run, jobs):
            accuracy[name] = acc
            seconds[name] = secs
            optimizer_steps[name] = updates
            print(f"      {name:<20} held-out accuracy {acc:.3f}  ({secs:.0f}s, {updates} optimiser steps)",
                  flush=True)
    accuracy["fp32-grpo-lowlr-seed1"] = accuracy["grpo-lowlr-seed1"]
    print("[3/3] measuring with rlsub-tui's own engine", flush=True)
    from rlsub_tui.sample.report import measure, measure_transplant

    measurements = measure(out)
    measurements["transplant"] = measure_transplant(out, model_cfg, te)
    from rlsub_tui.sample.report import render_readme

    record = {
        "model": asdict(model_cfg),
        "task": "two-digit addition a+b (0<=a,b<100), answer digits reversed, 80/20 train/held-out split",
        "held_out_prompts": len(te),
        "pretrain": asdict(spec["pretrain"]),
        "base_retrained": args.base is None,
        "runs": {name: {"kind": kind, "config": asdict(cfg)} for name, (kind, cfg, _) in spec["runs"].items()},
        "held_out_accuracy": accuracy,
        "optimizer_steps": optimizer_steps,
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
