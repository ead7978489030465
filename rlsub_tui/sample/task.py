"""The verifiable task: two-digit addition, answer written with its digits reversed (easier for a tiny model)."""

from __future__ import annotations

import torch

PLUS, EQUALS, BOS, EOS, PAD = 10, 11, 12, 13, 14
VOCAB = 16  # token 15 is never used: its embedding row gets no gradient, as unused tokens in real models
PROMPT_LEN = 7  # BOS a1 a0 + b1 b0 =
ANSWER_LEN = 4  # s0 s1 s2 EOS


def split_pairs(seed: int = 0, held_out: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """All (a, b) with 0 <= a, b < 100, split into training and held-out pairs."""
    a, b = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(pairs) * held_out)
    return pairs[perm[n_test:]], pairs[perm[:n_test]]


def prompts(pairs: torch.Tensor) -> torch.Tensor:
    a, b = pairs[:, 0], pairs[:, 1]
    cols = [torch.full_like(a, BOS), a // 10, a % 10, torch.full_like(a, PLUS), b // 10, b % 10,
            torch.full_like(a, EQUALS)]
    return torch.stack(cols, dim=1)


def answers(pairs: torch.Tensor) -> torch.Tensor:
    s = pairs[:, 0] + pairs[:, 1]
    return torch.stack([s % 10, (s // 10) % 10, s // 100, torch.full_like(s, EOS)], dim=1)


def reward(pairs: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """1.0 when the completion is exactly the reversed sum followed by EOS, else 0.0."""
    return (completions[:, :ANSWER_LEN] == answers(pairs)).all(dim=1).float()
