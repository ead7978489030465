"""Measure the generated sample with our own engine, for sample_data/README.md and training.json."""

from __future__ import annotations

from pathlib import Path

from rlsub_tui.engine import Analysis, AnalysisOptions
from rlsub_tui.masks import Criterion

FAMILIES = {
    "grpo-lowlr": ["grpo-lowlr-seed1", "grpo-lowlr-seed2", "grpo-lowlr-seed3"],
    "grpo-highlr": ["grpo-highlr-seed1", "grpo-highlr-seed2", "grpo-highlr-seed3"],
    "sft": ["sft"],
    "fp32": ["fp32-grpo-lowlr-seed1"],
}


def measure(root: Path) -> dict:
    out = {}
    for family, names in FAMILIES.items():
        paths = [str(root / n) for n in names if (root / n).is_dir()]
        if not paths:
            continue
        a = Analysis(str(root / "base"), paths,
                     AnalysisOptions(criterion=Criterion("atol", 1e-5), sweep=(1e-8, 1e-7, 1e-6, 1e-5),
                                     use_cache=False, device="cpu"))
        result = a.run_all()
        a.close()
        s = result.stats()
        fam = {"runs": {}}
        for i, label in enumerate(result.run_labels):
            fam["runs"][label] = {
                "sparsity": s.sparsity(i),
                "sparsity_sweep": [s.sweep_sparsity(i, j) for j in range(len(result.sweep))],
                "mean_rank_ratio": s.mean_rank_ratio(i),
            }
        pairs = [dict(run_a=result.run_labels[x], run_b=result.run_labels[y], **p) for x, y, p in s.pairs()]
        fam["pairs"] = pairs
        fam["consensus"] = s.consensus()
        fam["consensus_chance"] = s.consensus_chance()
        fam["sign_agreement"] = s.sign_agreement()
        norms = result.stats([n for n in result.tensors if "norm" in n])
        fam["norm_sparsity_mean"] = norms.mean_sparsity()
        out[family] = fam
    return out
