"""The bundled base against three of its GRPO seeds stored as each trainer stores them (verl FSDP shards, a
torch.distributed.checkpoint folder, DeepSpeed ZeRO-3 partitions; tests/bundled_writer.py) gives the same counts,
ranks, overlaps and subspace overlaps as the same fp32 weights written as Hugging Face exports, with
--compare-dtype stored; and the counts are numpy's, from the exports' bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import mask, round_bf16
from safetensors.torch import load_file

from rlsub_tui.compute.engine import Analysis
from rlsub_tui.records.criteria import AnalysisOptions

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install deepspeed to write the ZeRO runs")
ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "sample_data" / "base"
SEEDS = (1, 2, 3)


@pytest.fixture(scope="session")
def bundled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundled")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH"))
                                         if p)}
    subprocess.run([sys.executable, str(ROOT / "tests" / "bundled_writer.py"), str(out)], check=True, env=env,
                   timeout=600, capture_output=True)
    return out


def analysed(runs: list[Path]):
    a = Analysis(str(BASE), [str(r) for r in runs], AnalysisOptions(compare_dtype="stored", use_cache=False))
    try:
        return a.run_all()
    finally:
        a.close()


@pytest.fixture(scope="session")
def from_exports(bundled):
    return analysed([bundled / "export" / f"seed{s}" for s in SEEDS])


def widened(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as float32 arrays, bf16 ones widened by numpy from their bits."""
    out = {}
    for name, t in load_file(str(path)).items():
        if t.dtype == torch.bfloat16:
            out[name] = (t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = t.numpy()
    return out


def test_the_exports_count_as_numpy_counts(bundled, from_exports):
    """The reference itself: each fp32 run against the bf16 base, true updates in fp32 and updates with both
    values in bf16 (the pair's comparison dtype under --compare-dtype stored)."""
    base = widened(BASE / "model.safetensors")
    for j, s in enumerate(SEEDS):
        run = widened(bundled / "export" / f"seed{s}" / "model.safetensors")
        for name, w0 in base.items():
            got = from_exports.tensors[name].runs[j]
            assert got.true_updated == int(mask(w0, run[name], "fp32").sum()), (s, name)
            assert got.updated == int(mask(w0, round_bf16(run[name]), "bf16").sum()), (s, name)


@pytest.mark.parametrize("layout, run_folder", [
    ("fsdp", "fsdp/seed{s}/actor"),
    ("dcp", "dcp/seed{s}"),
    ("zero", "zero/seed{s}"),
])
def test_each_trainer_layout_gives_the_exports_figures(bundled, from_exports, layout, run_folder):
    got = analysed([bundled / run_folder.format(s=s) for s in SEEDS])
    want = from_exports
    assert got.complete and not got.skipped and sorted(got.tensors) == sorted(want.tensors)
    hidden = ranked = 0
    for name, tg in got.tensors.items():
        tw = want.tensors[name]
        for rg, rw in zip(tg.runs, tw.runs):
            assert (rg.dtype, rg.true_dtype, rg.updated, rg.true_updated, rg.hidden_by_bf16, rg.rank) == \
                (rw.dtype, rw.true_dtype, rw.updated, rw.true_updated, rw.hidden_by_bf16, rw.rank), (layout, name)
            hidden += rg.hidden_by_bf16 or 0
            ranked += rg.rank is not None
        assert tg.both == tw.both and tg.agreement == tw.agreement, (layout, name)
        assert tg.subspace_rows() == tw.subspace_rows(), (layout, name)
    assert hidden > 0  # the fp32 GRPO run's updates that bf16 hides
    assert ranked == 3 * sum(len(t.shape) == 2 for t in got.tensors.values())
    assert any(t.subspace_rows() for t in got.tensors.values())
    sg, sw = got.stats(), want.stats()
    for i in range(3):
        for j in range(i + 1, 3):
            assert sg.pair(i, j) == sw.pair(i, j)
