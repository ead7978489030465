"""One fine-tuning run of the bundled sample, as a worker process of the generator runs it."""

from __future__ import annotations

import shutil
import time

import torch

from rlsub_tui.sample import task, train


def train_run(args) -> tuple[str, float, float, int | None]:
    """One fine-tuning run in a worker process: its checkpoint(s), held-out accuracy, seconds, optimiser steps."""
    name, kind, cfg, out, model_cfg = args
    torch.set_num_threads(1)  # one thread per process: deterministic and parallel across runs
    tr, te = task.split_pairs()
    t0 = time.perf_counter()
    stats: dict = {}
    shutil.rmtree(out / name, ignore_errors=True)  # a folder of step checkpoints must hold nothing else
    timeline = kind == "grpo" and bool(cfg.snapshots)
    if kind == "grpo":
        def snapshot(step, model):
            train.save_checkpoint(model, out / name / f"checkpoint-{step}", torch.bfloat16)
        model = train.grpo(model_cfg, out / "base", cfg, tr, name, on_snapshot=snapshot, stats=stats)
    else:
        model = train.sft(model_cfg, out / "base", cfg, tr, name)
    train.save_checkpoint(model, out / name / f"checkpoint-{cfg.steps}" if timeline else out / name, torch.bfloat16)
    if name == "grpo-lowlr-seed1":
        train.save_checkpoint(model, out / "fp32-grpo-lowlr-seed1", torch.float32)
    return name, train.accuracy(model, te), time.perf_counter() - t0, stats.get("optimizer_steps", cfg.steps)
