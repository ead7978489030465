"""Tied tensors counted once, and fp8 weights dequantised with their block scales (or compared on codes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference
import torch
from safetensors.torch import save_file
from synthetic import base_state, save, sparse_run

from rlsub_tui.checkpoints.fp8 import dequantise
from rlsub_tui.cli.main import main
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.records.criteria import AnalysisOptions


def analyze(base, runs, **kw):
    kw.setdefault("use_cache", False)
    kw.setdefault("rank", False)
    a = Analysis(str(base), [str(r) for r in runs], AnalysisOptions(**kw))
    a.run_all()
    a.close()
    return a.result


def tied_state(seed: int = 0):
    state = base_state(seed)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one storage, two names
    return state


def test_shared_storage_in_a_pickle_is_one_tensor(tmp_path):
    b = tied_state()
    runs = [sparse_run(b, s) for s in range(2)]
    for r in runs:
        r["lm_head.weight"] = r["model.embed_tokens.weight"]
    save(b, tmp_path / "base", "bin")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}", "bin")
    result = analyze(tmp_path / "base", [tmp_path / "run0", tmp_path / "run1"])
    assert result.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in result.tensors and not result.skipped
    assert result.stats().numel == sum(t.numel() for n, t in b.items() if n != "lm_head.weight")
    names = [n for n in b if n != "lm_head.weight"]
    exp = [sum(int(reference.mask(b[n].float().numpy(), r[n].float().numpy(), "bf16").sum()) for n in names)
           for r in runs]
    assert [int(u) for u in result.stats().updated] == exp


def test_views_at_other_offsets_are_not_tied(tmp_path):
    fused = torch.randn(8, 4).to(torch.bfloat16)
    state = {"a": fused[:4], "b": fused[4:], "c": fused}
    run = {k: (v.float() + 0.5).to(torch.bfloat16) for k, v in state.items()}
    torch.save(state, (tmp_path / "base.bin"))
    torch.save(run, (tmp_path / "run.bin"))
    result = analyze(tmp_path / "base.bin", [tmp_path / "run.bin"])
    assert result.tied == {} and set(result.tensors) == {"a", "b", "c"}


@pytest.mark.parametrize("tie,expect_tied", [(True, True), (None, True), (False, False)])
def test_safetensors_tie_needs_identical_bytes_and_the_config(tmp_path, tie, expect_tied):
    b = {n: t.clone() for n, t in tied_state().items()}
    runs = [sparse_run(b, s) for s in range(2)]
    for r in runs:
        r["lm_head.weight"] = r["model.embed_tokens.weight"].clone()
    save(b, tmp_path / "base")
    for i, r in enumerate(runs):
        save(r, tmp_path / f"run{i}")
    config = {} if tie is None else {"tie_word_embeddings": tie}
    for d in ("base", "run0", "run1"):
        (tmp_path / d / "config.json").write_text(json.dumps(config))
    result = analyze(tmp_path / "base", [tmp_path / "run0", tmp_path / "run1"])
    assert ("lm_head.weight" in result.tied) == expect_tied
    assert ("lm_head.weight" in result.tensors) != expect_tied
    assert not result.skipped


def test_same_bytes_without_a_tie_in_the_config_are_two_tensors(tmp_path):
    b = base_state()
    b["lm_head.weight"] = b["model.embed_tokens.weight"].clone()
    save(b, tmp_path / "base")
    save(sparse_run(b, 0), tmp_path / "run")
    (tmp_path / "base" / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert analyze(tmp_path / "base", [tmp_path / "run"]).tied == {}


def test_a_tie_broken_in_a_run_is_listed(tmp_path, capsys):
    b = tied_state()
    save(b, tmp_path / "base", "bin")
    run = sparse_run(b, 0)  # lm_head and embed_tokens now two different tensors
    save(run, tmp_path / "run", "bin")
    result = analyze(tmp_path / "base", [tmp_path / "run"])
    assert [(k.tensor, k.run) for k in result.skipped] == [("lm_head.weight", "run")]
    assert "tied to model.embed_tokens.weight in the base" in result.skipped[0].reason


def test_cli_names_the_alias(tmp_path, capsys):
    b = tied_state()
    save(b, tmp_path / "base", "bin")
    r = sparse_run(b, 0)
    r["lm_head.weight"] = r["model.embed_tokens.weight"]
    save(r, tmp_path / "run", "bin")
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                 "--quiet", "--no-cache"]) == 0
    err = capsys.readouterr().err
    assert "lm_head.weight is the same tensor as model.embed_tokens.weight in the base 'base' (tied)" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tied"] == [{"alias": "lm_head.weight", "counted_as": "model.embed_tokens.weight"}]
    assert any("same tensor" in n for n in summary["notes"])


# --- fp8 ---------------------------------------------------------------------------------------------------

def _fp8_pair(g, shape=(300, 260), block=128):
    w = torch.from_numpy(g.normal(scale=0.05, size=shape).astype(np.float32))
    blocks = (-(-shape[0] // block), -(-shape[1] // block))
    scale = torch.from_numpy(g.uniform(0.5, 2.0, size=blocks).astype(np.float32)) * 1e-2
    return w, scale


def _quantise(w, scale, block=128):
    full = scale.repeat_interleave(block, 0)[:w.shape[0]].repeat_interleave(block, 1)[:, :w.shape[1]]
    return (w / full).to(torch.float8_e4m3fn)


def _numpy_dequant(codes: torch.Tensor, scale: np.ndarray, block=128) -> np.ndarray:
    c = codes.float().numpy().astype(np.float64)
    m, n = c.shape
    out = np.empty_like(c)
    for i in range(0, m, block):
        for j in range(0, n, block):
            out[i:i + block, j:j + block] = c[i:i + block, j:j + block] * scale[i // block, j // block]
    return out.astype(np.float32)


def test_fp8_with_block_scale_is_dequantised(tmp_path):
    g = np.random.default_rng(0)
    w, scale = _fp8_pair(g)
    base_codes = _quantise(w, scale)
    run_w = w + torch.from_numpy((g.random(w.shape) < 0.3) * g.normal(scale=0.02, size=w.shape)).float()
    run_scale = scale * 1.01
    run_codes = _quantise(run_w, run_scale)
    for d, codes, sc in (("base", base_codes, scale), ("run", run_codes, run_scale)):
        (tmp_path / d).mkdir()
        save_file({"model.layers.0.mlp.down_proj.weight": codes, "model.layers.0.mlp.down_proj.weight_scale_inv": sc,
                   "model.norm.weight": torch.ones(4)}, str(tmp_path / d / "model.safetensors"))
        (tmp_path / d / "config.json").write_text(json.dumps(
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}))
    result = analyze(tmp_path / "base", [tmp_path / "run"], rank=True)
    name = "model.layers.0.mlp.down_proj.weight"
    assert set(result.tensors) == {name, "model.norm.weight"} and not result.skipped
    b = _numpy_dequant(base_codes, scale.numpy())
    r = _numpy_dequant(run_codes, run_scale.numpy())
    want = reference.mask(b, r, "fp32")
    got = result.tensors[name].runs[0]
    assert got.updated == int(want.sum()) and got.dtype == "fp32"
    # the same codes with a different scale are an update: the stored codes alone would miss it
    assert got.updated > int((base_codes.view(torch.uint8) != run_codes.view(torch.uint8)).sum())
    assert got.rank == int(np.linalg.matrix_rank(r - b))
    assert any("dequantised with their block scales" in n for n in result.notes)
    assert torch.equal(dequantise(base_codes, scale, (128, 128)), torch.from_numpy(b))


def test_fp8_without_a_scale_is_compared_on_codes_with_a_note(tmp_path):
    g = np.random.default_rng(1)
    w = torch.from_numpy(g.normal(scale=0.05, size=(16, 8)).astype(np.float32))
    base = w.to(torch.float8_e4m3fn)
    run = (w * torch.from_numpy(1 + (g.random(w.shape) < 0.5) * 0.2).float()).to(torch.float8_e4m3fn)
    save({"w": base}, tmp_path / "base")
    save({"w": run}, tmp_path / "run")
    result = analyze(tmp_path / "base", [tmp_path / "run"])
    got = result.tensors["w"].runs[0].updated
    assert got == int((base.view(torch.uint8) != run.view(torch.uint8)).sum()) > 0
    assert any("no block scale: compared on their stored fp8 codes" in n for n in result.notes)


def test_a_scale_that_does_not_fit_is_listed(tmp_path):
    codes = torch.zeros(300, 260).to(torch.float8_e4m3fn)
    for d in ("base", "run"):
        (tmp_path / d).mkdir()
        save_file({"w": codes, "w_scale_inv": torch.ones(2, 2), "n": torch.ones(3)},
                  str(tmp_path / d / "model.safetensors"))
    result = analyze(tmp_path / "base", [tmp_path / "run"])
    assert [k.tensor for k in result.skipped] == ["w"]
    assert "does not fit" in result.skipped[0].reason


def test_a_changed_config_is_not_answered_from_the_cache(tmp_path):
    b = {n: t.clone() for n, t in tied_state().items()}
    run = sparse_run(b, 0)
    run["lm_head.weight"] = run["model.embed_tokens.weight"].clone()
    save(b, tmp_path / "base")
    save(run, tmp_path / "run")
    cached = dict(use_cache=True, cache_dir=tmp_path / "cache")
    assert "lm_head.weight" in analyze(tmp_path / "base", [tmp_path / "run"], **cached).tied
    (tmp_path / "base" / "config.json").write_text(json.dumps({"tie_word_embeddings": False, "x": 1}))
    again = analyze(tmp_path / "base", [tmp_path / "run"], **cached)
    assert again.tied == {} and "lm_head.weight" in again.tensors
    assert again.stats().numel == analyze(tmp_path / "base", [tmp_path / "run"]).stats().numel
