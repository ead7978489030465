"""Does each run look like a fine-tune of the base? Three stated rules, and the architectures from config.json.

No torch here: the rules read config.json files, the list of tensors left out, and pooled norms.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlsub_tui.checkpoints.locate import config_file

# The phrase every warning of this module carries (the explorer shows these apart from other notes).
NOT_A_FINE_TUNE = "does not look like a fine-tune of the base"
# Rule 2: more than this share of the base's tensors has no comparable tensor in the run.
UNMATCHED_LIMIT = 0.5
# Rule 3: the median over tensors of the run's ‖Δ‖/‖W0‖ is above this. Fine-tuning moves weights by a few
# percent of their norm at most (the bundled RL and SFT runs: ~1-2%); two unrelated models of one shape are
# at ~1 (~1.4 for two random inits).
RELATIVE_NORM_LIMIT = 0.5


def architecture(files: list[Path]) -> str | None:
    """The architecture a checkpoint's config.json names ('architectures', else 'model_type'); None if unknown. The
    config is found where locate.config_file finds it: beside the weights, or where a layout keeps it apart (verl's
    actor/huggingface/, the Trainer folder around a ZeRO tag or an accelerate DCP folder)."""
    config = config_file([Path(f) for f in files])
    if config is None:
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    archs = data.get("architectures")
    if isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs):
        return ",".join(archs)
    kind = data.get("model_type")
    return kind if isinstance(kind, str) and kind else None


def _archs(base_arch: str | None, run_arch: str | None) -> str:
    return f"config.json: base {base_arch or 'unknown'}, run {run_arch or 'unknown'}"


def architectures_note(base, runs) -> str:
    """' (config.json: base X; runs Y, Z)', or '' when no config.json names an architecture."""
    base_arch = architecture(base.files)
    run_archs = [architecture(r.files) for r in runs]
    if not base_arch and not any(run_archs):
        return ""
    return (f" (config.json: base {base_arch or 'unknown'}; run(s) "
            + ", ".join(f"{r.label} {a or 'unknown'}" for r, a in zip(runs, run_archs)) + ")")


def open_warnings(base, runs, skipped) -> list[str]:
    """Rules 1 and 2, known from the headers: another architecture named in config.json, or more than
    half of the base's tensors unmatched in the run. `base`, `runs`: opened checkpoints; `skipped`: the
    tensors left out (rlsub_tui.records.results.Skipped)."""
    base_arch = architecture(base.files)
    n_base = len(base.tensors)
    out = []
    for run in runs:
        run_arch = architecture(run.files)
        unmatched = {k.tensor for k in skipped if k.run in (run.label, "*") and k.tensor in base.tensors}
        if base_arch and run_arch and base_arch != run_arch:
            out.append(f"run '{run.label}' {NOT_A_FINE_TUNE} '{base.label}': another architecture "
                       f"({_archs(base_arch, run_arch)}); its numbers compare two different models.")
        elif n_base and len(unmatched) > UNMATCHED_LIMIT * n_base:
            out.append(f"run '{run.label}' {NOT_A_FINE_TUNE} '{base.label}': {len(unmatched)} of the base's "
                       f"{n_base} tensors have no match in it ({_archs(base_arch, run_arch)}).")
    return out


def median_relative_norm(result, run: int) -> float:
    """The median over compared tensors of ‖Δ‖/‖W0‖ (robust to a few large norm vectors dominating a pool)."""
    ratios = sorted(math.sqrt(t.runs[run].sq_delta / t.runs[run].sq_base)
                    for t in result.tensors.values() if t.runs[run].sq_base > 0)
    if not ratios:
        return math.nan
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def distance_warnings(result) -> list[str]:
    """Rule 3, known once computed: a run whose median per-tensor ‖Δ‖/‖W0‖ is above RELATIVE_NORM_LIMIT."""
    out = []
    for i, label in enumerate(result.run_labels):
        rel = median_relative_norm(result, i)
        if not math.isnan(rel) and rel > RELATIVE_NORM_LIMIT:
            out.append(f"run '{label}' {NOT_A_FINE_TUNE} '{result.base_label}': the median over tensors of "
                       f"‖Δ‖/‖W0‖ is {rel:.3g} (fine-tuning stays far below {RELATIVE_NORM_LIMIT:g}).")
    return out
