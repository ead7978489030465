"""Training for the bundled sample: a base from scratch, GRPO from several seeds, and an SFT contrast.

Weights and Adam state are kept in fp32 (master weights, as real trainers do); the saved
checkpoints are bf16, as released checkpoints are. Runs start from the bf16-rounded base.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rlsub_tui.sample import task
from rlsub_tui.sample.model import LlamaConfig, TinyLlama


@dataclass
class PretrainConfig:
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    seed: int = 0


@dataclass
class GRPOConfig:
    steps: int = 1000
    lr: float = 3e-6
    prompts_per_step: int = 16
    group: int = 8
    epochs: int = 2  # policy updates per batch; from the second on, the clipped ratio is active
    clip: float = 0.2
    kl_coef: float = 0.0
    temperature: float = 1.0
    seed: int = 1
    snapshots: tuple[int, ...] = ()  # steps (before the last) after which a checkpoint is saved as well


@dataclass
class SFTConfig:
    steps: int = 1000
    lr: float = 3e-6
    batch: int = 16
    seed: int = 1


def log(msg: str) -> None:
    print(msg, flush=True)


def adam(model, lr):
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def answer_loss(model: TinyLlama, pairs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens given the prompt (teacher forcing)."""
    seq = torch.cat([task.prompts(pairs), task.answers(pairs)], dim=1)
    logits = model(seq[:, :-1])[:, task.PROMPT_LEN - 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, task.PROMPT_LEN:].reshape(-1))


@torch.no_grad()
def generate(model: TinyLlama, prompt_ids: torch.Tensor, greedy: bool, gen: torch.Generator | None = None,
             temperature: float = 1.0) -> torch.Tensor:
    seq = prompt_ids
    for _ in range(task.ANSWER_LEN):
        logits = model(seq)[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, task.PROMPT_LEN:]


@torch.no_grad()
def accuracy(model: TinyLlama, pairs: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    hits = 0.0
    for i in range(0, len(pairs), batch):
        p = pairs[i:i + batch]
        hits += float(task.reward(p, generate(model, task.prompts(p), greedy=True)).sum())
    return hits / len(pairs)


def completion_logprobs(model: TinyLlama, seq: torch.Tensor) -> torch.Tensor:
    logits = model(seq[:, :-1])[:, task.PROMPT_LEN - 1:].float()
    logp = F.log_softmax(logits, dim=-1)
    return logp.gather(-1, seq[:, task.PROMPT_LEN:, None]).squeeze(-1)


def completion_mask(completions: torch.Tensor) -> torch.Tensor:
    """True up to and including the first EOS."""
    is_eos = completions == task.EOS
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return ~after


def save_checkpoint(model: TinyLlama, directory: Path, dtype=torch.bfloat16) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().to(dtype).contiguous() for n, p in model.named_parameters()}
    # Only the one key: safetensors writes metadata from a hash map in random order, so more keys
    # would make the bytes differ between identical runs. The configuration is in training.json.
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    cfg = model.cfg.to_hf(task.BOS, task.EOS, task.PAD, name)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_model(directory: Path, cfg: LlamaConfig) -> TinyLlama:
    model = TinyLlama(cfg)
    state = load_file(str(directory / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def pretrain(cfg: LlamaConfig, pc: PretrainConfig, train_pairs: torch.Tensor) -> TinyLlama:
    torch.manual_seed(pc.seed)
    model = TinyLlama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(pc.seed)
    start = time.perf_counter()
    for step in range(pc.steps):
        model.train()
        idx = torch.randint(len(train_pairs), (pc.batch,), generator=gen)
        loss = answer_loss(model, train_pairs[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"  base   step {step + 1}/{pc.steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")
    return model


def grpo(cfg: LlamaConfig, base_dir: Path, gc: GRPOConfig, train_pairs: torch.Tensor, tag: str,
         on_snapshot=None, stats: dict | None = None) -> TinyLlama:
    """GRPO: G samples per prompt, reward 1 if correct, group-normalised advantages, clipped ratio.

    `on_snapshot(step, model)` is called after each step in `gc.snapshots`; `stats` receives the
    number of optimiser steps taken (batches whose groups all got one reward take none).
    """
    updates = 0
    torch.manual_seed(gc.seed)
    policy = load_model(base_dir, cfg)
    ref = load_model(base_dir, cfg) if gc.kl_coef > 0 else None
    opt = adam(policy, gc.lr)
    gen = torch.Generator().manual_seed(gc.seed)
    start = time.perf_counter()
    mean_reward = 0.0
    for step in range(gc.steps):
        idx = torch.randint(len(train_pairs), (gc.prompts_per_step,), generator=gen)
        pairs = train_pairs[idx].repeat_interleave(gc.group, dim=0)
        prompt_ids = task.prompts(pairs)
        policy.eval()
        completions = generate(policy, prompt_ids, greedy=False, gen=gen, temperature=gc.temperature)
        rewards = task.reward(pairs, completions).view(gc.prompts_per_step, gc.group)
        adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        adv = adv.reshape(-1, 1)
        seq = torch.cat([prompt_ids, completions], dim=1)
        mask = completion_mask(completions).float()
        with torch.no_grad():
            old = completion_logprobs(policy, seq)
            ref_lp = completion_logprobs(ref, seq) if ref is not None else None
        mean_reward = 0.95 * mean_reward + 0.05 * float(rewards.mean()) if step else float(rewards.mean())
        # every group uniform: all advantages zero, no gradient and no optimiser step (as in GRPO)
        if float(rewards.std(1).sum()) != 0.0:
            _policy_update(policy, opt, gc, seq, old, ref_lp, adv, mask)
            updates += gc.epochs
        if on_snapshot is not None and step + 1 in gc.snapshots:
            on_snapshot(step + 1, policy)
        if (step + 1) % 100 == 0:
            log(f"  {tag:<16} step {step + 1}/{gc.steps}  train reward {mean_reward:.3f}  "
                f"{time.perf_counter() - start:.0f}s")
    if stats is not None:
        stats["optimizer_steps"] = updates
    return policy


def _policy_update(policy: TinyLlama, opt, gc: GRPOConfig, seq, old, ref_lp, adv, mask) -> None:
    """`gc.epochs` optimiser steps on one batch of sampled completions (the clipped GRPO objective)."""
    policy.train()
    for _ in range(gc.epochs):
        new = completion_logprobs(policy, seq)
        ratio = torch.exp(new - old)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - gc.clip, 1 + gc.clip) * adv)
        per_token = -surrogate
        if ref_lp is not None:
            log_r = ref_lp - new
            per_token = per_token + gc.kl_coef * (torch.exp(log_r) - log_r - 1)
        loss = (per_token * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()


def sft(cfg: LlamaConfig, base_dir: Path, sc: SFTConfig, train_pairs: torch.Tensor, tag: str) -> TinyLlama:
    torch.manual_seed(sc.seed)
    model = load_model(base_dir, cfg)
    opt = adam(model, sc.lr)
    gen = torch.Generator().manual_seed(sc.seed)
    start = time.perf_counter()
    for step in range(sc.steps):
        model.train()
        idx = torch.randint(len(train_pairs), (sc.batch,), generator=gen)
        loss = answer_loss(model, train_pairs[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"  {tag:<16} step {step + 1}/{sc.steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")
    return model
