"""The comparison dtype of each base/run pair: the less precise of the two, or one forced by --compare-dtype."""

from __future__ import annotations

from collections import Counter

import torch

DTYPE_NAMES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.float8_e4m3fn: "f8_e4m3", torch.float8_e5m2: "f8_e5m2",
}
FORCED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def dtypes_label(dtypes: list[torch.dtype]) -> str:
    """The comparison dtypes of a tensor's pairs, each once in run order: 'bf16', or 'bf16/fp32' when pairs differ."""
    return "/".join(dict.fromkeys(dtype_name(d) for d in dtypes))


def less_precise(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two floating dtypes (larger machine epsilon)."""
    if a == b:
        return a
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def pair_dtype(base: torch.dtype, run: torch.dtype, policy: str = "stored") -> torch.dtype:
    """The dtype one run is compared with the base in: depends on that pair alone, never on other runs."""
    if policy == "stored":
        return less_precise(base, run)
    return FORCED[policy]


def finer_than_bf16(dtype: torch.dtype) -> bool:
    """A floating dtype with more mantissa than bf16 (fp16, fp32, fp64): updates that bf16 may hide."""
    return dtype.is_floating_point and torch.finfo(dtype).eps < torch.finfo(torch.bfloat16).eps


def true_update_dtype(base: torch.dtype, run: torch.dtype, compared: torch.dtype) -> torch.dtype | None:
    """Where a run stored finer than bf16 is compared in another dtype: the stored precision its true updates
    are counted in besides (the finer of the pair; the base casts up exactly). None when the comparison
    already is that precision, or the run is stored in bf16 or coarser."""
    if not finer_than_bf16(run):
        return None
    stored = run if less_precise(base, run) == base else base
    return None if stored == compared else stored


class CastLog:
    """Which runs had tensors cast for comparison, counted per (base dtype, run dtype, compared in)."""

    def __init__(self, policy: str = "stored"):
        self.policy = policy
        self.casts: dict[str, Counter] = {}

    def record(self, run_label: str, base: torch.dtype, run: torch.dtype, compared: torch.dtype) -> None:
        if base == run == compared:
            return
        self.casts.setdefault(run_label, Counter())[(base, run, compared)] += 1

    def notes(self) -> list[str]:
        """One note per run that was cast, naming the run and how many tensors went which way."""
        why = "the less precise of the pair" if self.policy == "stored" else f"--compare-dtype {self.policy}"
        out = []
        for label, counts in self.casts.items():
            parts = [f"{n} tensor{'s' if n > 1 else ''} {dtype_name(r)} vs base {dtype_name(b)} "
                     f"compared in {dtype_name(c)}" for (b, r, c), n in sorted(counts.items(), key=str)]
            out.append(f"run '{label}': {'; '.join(parts)} ({why}).")
        return out
