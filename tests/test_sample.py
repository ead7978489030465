"""The bundled sample: real training code, checkpoints that transformers loads, files that do not drift."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rlsub_tui.checkpoints.sample_paths import sample_checkpoints, sample_dir
from rlsub_tui.sample import task
from rlsub_tui.sample.__main__ import main as generate
from rlsub_tui.sample.model import LlamaConfig, TinyLlama
from rlsub_tui.sample.train import completion_mask, load_model

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def test_committed_files_match_their_checksums():
    sums = json.loads((SAMPLE / "SHA256SUMS.json").read_text())
    assert len(sums) >= 2 * 10 + 2 * 6  # weights and config of base, base-fp32, 6 GRPO, SFT, fp32 run, and the
    # two earlier checkpoints of each grpo-lowlr timeline
    for rel, digest in sums.items():
        assert hashlib.sha256((SAMPLE / rel).read_bytes()).hexdigest() == digest, rel


def test_sample_holds_base_three_seeds_per_family_and_sft():
    names = {p.name for p in SAMPLE.iterdir() if p.is_dir()}
    assert {"base", "sft"} <= names
    assert len([n for n in names if n.startswith("grpo-lowlr-seed")]) >= 3
    assert len([n for n in names if n.startswith("grpo-highlr-seed")]) >= 3
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 30e6
    record = json.loads((SAMPLE / "training.json").read_text())
    acc = record["held_out_accuracy"]
    assert all(acc[f"grpo-lowlr-seed{s}"] > acc["base"] for s in (1, 2, 3))


def test_committed_lowlr_seeds_are_timelines_and_sft_matches_their_optimiser_steps():
    from rlsub_tui.checkpoints.step_folders import find_timeline

    for s in (1, 2, 3):
        timeline = find_timeline(str(SAMPLE / f"grpo-lowlr-seed{s}"))
        assert timeline is not None and timeline.steps == [200, 500, 800]
    steps = json.loads((SAMPLE / "training.json").read_text())["optimizer_steps"]
    assert steps["sft"] == 2 * 800 and all(0 < steps[f"grpo-lowlr-seed{s}"] <= 1600 for s in (1, 2, 3))


def test_default_explorer_runs_are_the_grpo_seeds():
    base, runs = sample_checkpoints()
    assert Path(base) == sample_dir() / "base"
    assert sorted(Path(r).name for r in runs) == [f"grpo-{f}-seed{s}" for f in ("highlr", "lowlr") for s in (1, 2, 3)]


def test_forward_matches_transformers_on_committed_base():
    transformers = pytest.importorskip("transformers")
    cfg = LlamaConfig()
    ours = load_model(SAMPLE / "base", cfg).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(SAMPLE / "base"), torch_dtype=torch.float32).eval()
    tr, te = task.split_pairs()
    ids = torch.cat([task.prompts(te[:64]), task.answers(te[:64])], dim=1)
    with torch.no_grad():
        a = ours(ids)
        b = theirs(input_ids=ids).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_completion_mask_stops_after_eos():
    c = torch.tensor([[1, 2, task.EOS, 4], [task.EOS, 1, 1, 1], [1, 1, 1, 1]])
    assert completion_mask(c).tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]


def test_shortened_pipeline_writes_loadable_checkpoints(tmp_path):
    # --base: no pretraining, the committed base kept byte for byte (the one quick run of the pipeline here:
    # training it twice, with and without --base, would double the suite's longest test)
    assert generate(["--out", str(tmp_path), "--quick", "--jobs", "1", "--base", str(SAMPLE / "base")]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "base" / name).read_bytes() == (SAMPLE / "base" / name).read_bytes()
    expected = {n: tuple(p.shape) for n, p in TinyLlama(LlamaConfig()).named_parameters()}
    from rlsub_tui.checkpoints.step_folders import find_timeline

    timeline = find_timeline(str(tmp_path / "grpo-lowlr-seed1"))
    assert timeline.steps == [4, 10, 16]
    for run in ["base", "grpo-lowlr-seed1/checkpoint-4", "grpo-lowlr-seed1/checkpoint-16", "grpo-highlr-seed3", "sft",
                "fp32-grpo-lowlr-seed1", "base-fp32"]:
        with safe_open(str(tmp_path / run / "model.safetensors"), "pt") as f:
            assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == expected
            want = "F32" if "fp32" in run else "BF16"
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}
        cfg = json.loads((tmp_path / run / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"]
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["quick"] and "grpo-lowlr" in record["measurements"] and not record["base_retrained"]
    assert [t["steps"] for t in record["measurements"]["grpo-lowlr"]["timelines"]] == [[4, 10, 16]] * 3
    assert record["measurements"]["transplant"]["mask_true"] >= 0
    assert (tmp_path / "README.md").read_text().startswith("# The bundled sample")
    # measuring again (no training) keeps every earlier figure and adds nothing stale
    before = record["measurements"]
    (tmp_path / "README.md").unlink()
    assert generate(["--out", str(tmp_path), "--remeasure"]) == 0
    again = json.loads((tmp_path / "training.json").read_text())
    assert again["measurements"] == before and again["held_out_accuracy"] == record["held_out_accuracy"]
    readme = (tmp_path / "README.md").read_text()
    assert "Spectrum of the updates" in readme and "stratified" in readme
    lowlr = before["grpo-lowlr"]["directions"]["e90"]["left"]["pairs"]
    assert 0 <= lowlr["overlap"] <= 1 and lowlr["chance"] > 0
    assert f"| the three `grpo-lowlr` seeds | energy rank 90% | {lowlr['overlap']:.3f} ({lowlr['chance']:.3f}) |" in readme
    assert before["sft"]["directions"]["e90"]["right"]["per_pair"] == []  # one run: only its overlap with the base
    fam = before["grpo-lowlr"]
    assert "Precision and structure" in readme and "Hidden by bf16: of the fp32 run's" in readme
    fp32 = next(iter(before["fp32_exact"]["runs"].values()))
    assert 0 <= fp32["hidden_by_bf16"] <= 1 and 0 <= fp32["below_half_ulp"] <= 1
    assert all(v["hidden_by_bf16"] is None for v in fam["runs"].values())  # bf16 pairs: not above bf16
    assert all(v["row_share_chance"] is not None for v in fam["runs"].values())
    assert 0 <= fam["consensus_chance_strat"] <= 1
    assert all(0 <= v["mean_energy_rank_99_ratio"] <= v["mean_rank_ratio"] for v in fam["runs"].values())
    sums = json.loads((tmp_path / "SHA256SUMS.json").read_text())
    assert sums["training.json"] == hashlib.sha256((tmp_path / "training.json").read_bytes()).hexdigest()
    t = before["transplant"]
    assert 0 <= t["mask_true"] <= t["numel"] and t["control_changed"] <= t["mask_true"]
    assert t["transplant_changed"] <= min(t["mask_true"], t["run_changed"])
    assert 0 <= t["accuracy_transplant"] <= 1 and 0 <= t["accuracy_control"] <= 1
    assert "## The subnetwork transplanted" in readme and "## Training timelines" in readme
    assert "The base was not retrained" in readme
    # the sample's SFT takes as many optimiser steps as GRPO's nominal two per batch
    assert record["runs"]["sft"]["config"]["steps"] == 2 * record["runs"]["grpo-lowlr-seed1"]["config"]["steps"]
    assert all(0 < record["optimizer_steps"][f"grpo-lowlr-seed{s}"] <= 32 for s in (1, 2, 3))


def test_base_option_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(SystemExit, match="no model.safetensors"):
        generate(["--out", str(tmp_path / "out"), "--quick", "--base", str(tmp_path)])
    assert not (tmp_path / "out" / "base").exists()


def test_pretraining_writes_a_loadable_bf16_base(tmp_path):
    from rlsub_tui.sample.train import PretrainConfig, pretrain, save_checkpoint

    tr, _ = task.split_pairs()
    model = pretrain(LlamaConfig(), PretrainConfig(steps=2, batch=8), tr)
    save_checkpoint(model, tmp_path / "base")
    loaded = load_model(tmp_path / "base", LlamaConfig())
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p.detach().to(torch.bfloat16).float(), q.detach()), n


def test_the_bundled_readme_is_what_its_recorded_measurements_render():
    """sample_data/README.md shows training.json's figures: rendering them again gives the file byte for byte."""
    from rlsub_tui.sample.report import render_readme

    root = sample_dir()
    record = json.loads((root / "training.json").read_text())
    assert render_readme(record) == (root / "README.md").read_text()
    assert record["measurements"]["sft-and-grpo"]["directions"]["e90"]["left"]["per_pair"]
