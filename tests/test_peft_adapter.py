"""PEFT LoRA adapters read as runs (base + s·B·A), with fixtures written by peft itself and checked against
peft's own merge_and_unload and against numpy."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from rlsub_tui.checkpoints.checkpoint import open_checkpoint  # noqa: E402
from rlsub_tui.checkpoints.step_folders import find_timeline  # noqa: E402
from rlsub_tui.cli.main import main  # noqa: E402
from rlsub_tui.compute.engine import Analysis  # noqa: E402
from rlsub_tui.records.criteria import AnalysisOptions  # noqa: E402

TINY = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q0 = "model.layers.0.self_attn.q_proj.weight"


def write_base(directory: Path, **config) -> Path:
    """A tiny Llama saved by transformers in bf16 safetensors: the base."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **config}))
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


def lora_model(base: Path, config, seed: int):
    """The base in float32 (cast up exactly) wrapped by peft, every adapter weight random (lora_B starts at zero)."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:  # B·A entries ~2e-4: of the order of half a bf16 ULP, some visible, some hidden
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "_A" in name else 0.002))
            elif p.requires_grad:  # a modules_to_save copy
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return wrapped


def write_adapter(base: Path, directory: Path, config, seed: int, merged: Path | None = None) -> Path:
    """save_pretrained of the adapter; with `merged`, also merge_and_unload() written as a float32 HF export."""
    wrapped = lora_model(base, config, seed)
    wrapped.save_pretrained(directory)
    if merged is not None:
        wrapped.merge_and_unload().save_pretrained(merged)
    return directory


def lora(**kw):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LINEARS, **kw})


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A bf16 base, three LoRA seeds (r=4, alpha 8, all 14 linear matrices) and their merged float32 exports."""
    root = tmp_path_factory.mktemp("peft")
    base = write_base(root / "base")
    for s in range(3):
        write_adapter(base, root / f"lora-seed{s}", lora(), s, merged=root / f"merged-seed{s}")
    return root


def analyse(base: Path, runs: list[Path], **options):
    a = Analysis(str(base), [str(r) for r in runs],
                 AnalysisOptions(**{"compare_dtype": "stored", "rank": True, "use_cache": False, **options}))
    try:
        return a.run_all()
    finally:
        a.close()


def true_count(s) -> int:
    """True updates: counted in the stored precision where it is finer than the comparison, else the count itself."""
    return s.updated if s.true_updated is None else s.true_updated


def test_lora_runs_match_their_merged_exports(seeds):
    """Base vs the 3 adapters and base vs peft's own merge_and_unload() of them give the same numbers, tensor by
    tensor: updated, true updates, rank and pair overlaps. Both sides are float32 W0 + (B@A)·s, in that order, so
    the merged weights are the same bits (checked here too), and any figure may be compared exactly."""
    adapters = [seeds / f"lora-seed{s}" for s in range(3)]
    merged = [seeds / f"merged-seed{s}" for s in range(3)]
    for a, m in zip(adapters, merged):
        base = open_checkpoint(str(seeds / "base"))
        run = open_checkpoint(str(a), base=base)
        export = load_file(str(m / "model.safetensors"))
        assert set(run.tensors) == set(export) == set(base.tensors)
        for name in run.tensors:
            assert torch.equal(run.read(name).float(), export[name]), name
    ours, theirs = analyse(seeds / "base", adapters), analyse(seeds / "base", merged)
    assert not ours.skipped and not theirs.skipped
    assert set(ours.tensors) == set(theirs.tensors) == set(ours.planned)
    targets = [n for n in ours.tensors if n.endswith(tuple(f"{p}.weight" for p in LINEARS))]
    assert len(targets) == 14
    for name, t in ours.tensors.items():
        m = theirs.tensors[name]
        assert [s.updated for s in t.runs] == [s.updated for s in m.runs], name
        assert [true_count(s) for s in t.runs] == [true_count(s) for s in m.runs], name
        assert [s.rank for s in t.runs] == [s.rank for s in m.runs], name
        assert t.both == m.both, name
    for name in targets:
        assert all(s.true_updated is not None and s.true_dtype == "fp32" and s.dtype == "bf16"
                   for s in ours.tensors[name].runs)
    hidden = sum(s.true_updated - s.updated for n in targets for s in ours.tensors[n].runs)
    assert hidden > 0  # the float32 update keeps what the bf16 comparison does not see
    untouched = [n for n in ours.tensors if n not in targets]
    assert untouched and all(s.updated == 0 for n in untouched for s in ours.tensors[n].runs)
    assert sum("is a LoRA adapter (r=4, alpha 8, 14 target matrices)" in n for n in ours.notes) == 3


def _numpy_tensor(file: Path, name: str) -> np.ndarray:
    """One tensor straight from a safetensors file's bytes; bf16 widened to float32 by its bits."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    entry = json.loads(raw[8:8 + n])[name]
    start, end = entry["data_offsets"]
    data = raw[8 + n + start:8 + n + end]
    if entry["dtype"] == "BF16":
        return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
    return np.frombuffer(data, {"F32": np.float32}[entry["dtype"]]).reshape(entry["shape"])


def test_a_target_is_fp32_w0_plus_scaled_ba_by_numpy(seeds):
    """For q_proj of layer 0: ΔW = s·B@A from the adapter file read by numpy (float64), and the run's tensor is
    fp32(W0) + ΔW to within one float32 rounding; an untouched tensor is the base's own bits and dtype."""
    base = open_checkpoint(str(seeds / "base"))
    run = open_checkpoint(str(seeds / "lora-seed1"), base=base)
    adapter = load_numpy(str(seeds / "lora-seed1" / "adapter_model.safetensors"))
    key = "base_model.model." + Q0.removesuffix(".weight")
    a, b = adapter[f"{key}.lora_A.weight"].astype(np.float64), adapter[f"{key}.lora_B.weight"].astype(np.float64)
    w0 = _numpy_tensor(seeds / "base" / "model.safetensors", Q0).astype(np.float64)
    expected = w0 + (8 / 4) * (b @ a)
    got = run.read(Q0)
    assert run.tensors[Q0].dtype == got.dtype == torch.float32 and tuple(got.shape) == w0.shape
    # float32 rounding of B@A (r = 4 products and sums), of ·s and of + W0: a few ULPs of the terms, not of the sum
    bound = 2 ** -23 * (np.abs(w0) + np.abs(expected) + 8 * (np.abs(b) @ np.abs(a)))
    assert (np.abs(got.numpy() - expected) <= bound).all()
    assert np.abs(got.numpy() - w0).max() > 0
    norm = "model.layers.0.input_layernorm.weight"
    assert run.tensors[norm].dtype == torch.bfloat16
    assert torch.equal(run.read(norm).view(torch.int16), base.read(norm).view(torch.int16))


def test_reads_by_rows_and_by_bytes_agree(seeds):
    """A target read by its first rows, or as bytes in slices (the pinned staging path), is the full read's."""
    base = open_checkpoint(str(seeds / "base"))
    run = open_checkpoint(str(seeds / "lora-seed0"), base=base)
    name = "model.layers.1.mlp.down_proj.weight"
    full = run.read(name)
    assert torch.equal(run.read(name, rows=5), full[:5])
    assert run.read_shape(name, rows=5) == ((5, 48), 5 * 48 * 4)
    out = torch.empty(full.numel() * 4, dtype=torch.uint8)
    for start in range(0, out.numel(), 1000):
        n = min(1000, out.numel() - start)
        run.read_bytes(name, out[start:start + n], start)
    assert torch.equal(out.view(torch.float32).reshape(full.shape), full)
    assert run.reader._held is None  # released after its last byte: one tensor at most is ever held


def test_rslora_and_rank_and_alpha_patterns(seeds, tmp_path):
    """rsLoRA (s = alpha/√r) with per-module rank_pattern and alpha_pattern: each module's scale and rank as peft
    gives them, the same bits as merge_and_unload, and the note gives the ranges."""
    config = lora(use_rslora=True, rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 2})
    write_adapter(seeds / "base", tmp_path / "rs", config, 5, merged=tmp_path / "rs-merged")
    base = open_checkpoint(str(seeds / "base"))
    run = open_checkpoint(str(tmp_path / "rs"), base=base)
    assert run.reader.targets[Q0].r == 8 and run.reader.targets[Q0].scale == 8 / math.sqrt(8)
    down = "model.layers.1.mlp.down_proj.weight"
    assert run.reader.targets[down].scale == 2 / math.sqrt(4)
    assert run.reader.targets["model.layers.1.mlp.up_proj.weight"].scale == 8 / math.sqrt(4)
    export = load_file(str(tmp_path / "rs-merged" / "model.safetensors"))
    for name in run.tensors:
        assert torch.equal(run.read(name).float(), export[name]), name
    (note,) = run.notes()
    assert "r=4-8, alpha 2-8, rsLoRA, 14 target matrices" in note and "rank at most 8" in note


def test_fp32_rank_of_each_update_is_r(seeds):
    """Compared in float32, every target's update measures rank r (= 4), the bound the note states."""
    result = analyse(seeds / "base", [seeds / "lora-seed0", seeds / "lora-seed2"], compare_dtype="fp32")
    ranks = {n: [s.rank for s in t.runs] for n, t in result.tensors.items() if n.endswith("_proj.weight")}
    assert len(ranks) == 14 and all(r == [4, 4] for r in ranks.values()), ranks


def test_modules_to_save_and_embedding_lora(seeds, tmp_path):
    """lm_head in modules_to_save replaces the base's (stored float32); a LoRA on embed_tokens is (B·A)ᵀ·s, with
    the W0 copy peft saves beside it; both as merge_and_unload gives them."""
    config = lora(target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"])
    write_adapter(seeds / "base", tmp_path / "mts", config, 7, merged=tmp_path / "mts-merged")
    base = open_checkpoint(str(seeds / "base"))
    run = open_checkpoint(str(tmp_path / "mts"), base=base)
    assert run.reader.saved == {"lm_head.weight": "base_model.model.lm_head.weight"}
    assert run.reader.targets["model.embed_tokens.weight"].transpose
    export = load_file(str(tmp_path / "mts-merged" / "model.safetensors"))
    for name in run.tensors:
        assert torch.equal(run.read(name).float(), export[name]), name
    assert run.tensors["lm_head.weight"].dtype == torch.float32
    assert not torch.equal(run.read("lm_head.weight"), base.read("lm_head.weight").float())
    (note,) = run.notes()
    assert "3 target matrices, 1 tensor saved in full" in note


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D stores weights (in, out), so peft sets fan_in_fan_out and ΔW = (B·A)ᵀ·s: the same bits as
    merge_and_unload, on c_attn (B·A is 96x32, the weight 32x96) and c_fc of both layers."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                         fan_in_fan_out=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    wrapped.save_pretrained(tmp_path / "adapter")
    wrapped.merge_and_unload().save_pretrained(tmp_path / "merged")
    base = open_checkpoint(str(tmp_path / "base"))
    run = open_checkpoint(str(tmp_path / "adapter"), base=base)
    assert len(run.reader.targets) == 4 and all(t.transpose for t in run.reader.targets.values())
    export = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name in export:
        assert torch.equal(run.read(name).float(), export[name]), name


def test_keys_with_the_adapter_name_are_read_alike(seeds, tmp_path):
    """Older peft kept the adapter's name in the keys (lora_A.default.weight): the same run."""
    shutil.copytree(seeds / "lora-seed0", tmp_path / "old")
    file = tmp_path / "old" / "adapter_model.safetensors"
    state = load_file(str(file))
    save_file({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in state.items()}, str(file))
    base = open_checkpoint(str(seeds / "base"))
    old, new = open_checkpoint(str(tmp_path / "old"), base=base), open_checkpoint(str(seeds / "lora-seed0"), base=base)
    assert len(old.reader.targets) == 14
    assert all(torch.equal(old.read(n), new.read(n)) for n in new.tensors)


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_analyze_with_three_adapters(seeds, tmp_path, capsys):
    code, out, err = run_cli(["analyze", seeds / "base", *(seeds / f"lora-seed{s}" for s in range(3)),
                              "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    notes = json.loads((tmp_path / "out" / "summary.json").read_text())["notes"]
    assert [n for n in notes if "is a LoRA adapter" in n] == [
        f"run 'lora-seed{s}' is a LoRA adapter (r=4, alpha 8, 14 target matrices): its update is s·B·A (s = 2), "
        "of rank at most 4, read against the base 'base' in float32." for s in range(3)]
    assert "is a LoRA adapter" in err  # said on the terminal too


def test_trl_checkpoints_holding_adapters_are_a_timeline(seeds, tmp_path, capsys):
    """A Trainer's output folder of checkpoint-N adapters (and its own files beside them) is a timeline."""
    run = tmp_path / "trl-run"
    for step, seed in ((10, 0), (20, 1)):
        shutil.copytree(seeds / f"lora-seed{seed}", run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    timeline = find_timeline(str(run))
    assert timeline is not None and timeline.steps == [10, 20]
    code, _, err = run_cli(["analyze", seeds / "base", run, "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    rows = (tmp_path / "out" / "timeline.csv").read_text().splitlines()
    assert len(rows) > 1
    notes = json.loads((tmp_path / "out" / "summary.json").read_text())["notes"]
    assert any(n.startswith("run 'trl-run' is a LoRA adapter") for n in notes)


def test_a_tied_base_keeps_its_tie_in_the_adapter_run(seeds, tmp_path):
    """A base storing lm_head as a tie of embed_tokens: the adapter run, which changes neither, shares the tie,
    so lm_head is compared once (as embed_tokens) and nothing is skipped."""
    tied = tmp_path / "tied-base"
    tied.mkdir()
    config = json.loads((seeds / "base" / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    state = load_file(str(seeds / "base" / "model.safetensors"))
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, str(tied / "model.safetensors"))
    result = analyse(tied, [seeds / "lora-seed0"])
    assert result.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert not result.skipped and "lm_head.weight" not in result.planned


def test_a_transplant_of_an_adapter_run_is_the_base_with_peft_merge_on_the_mask(seeds, tmp_path, capsys):
    """masks works on an adapter run, and its transplant is written in the base's files under the base's names: each
    LoRA target in float32 (the run's stored dtype) holds peft's own merge_and_unload where the mask is true and the
    base elsewhere; every other tensor is the base's, as stored."""
    mask = tmp_path / "mask.safetensors"
    base_file = seeds / "base" / "model.safetensors"
    code, _, err = run_cli(["masks", seeds / "base", seeds / "lora-seed0", "--out", mask, "--quiet"], capsys)
    assert code == 0, err
    masks = {n: m.numpy() for n, m in load_file(str(mask)).items()}
    assert set(masks) == set(load_file(str(base_file)))
    code, _, err = run_cli(["transplant", seeds / "base", seeds / "lora-seed0", "--mask", mask,
                            "--out", tmp_path / "tp", "--quiet"], capsys)
    assert code == 0, err
    out = tmp_path / "tp" / "model.safetensors"
    assert [p.name for p in (tmp_path / "tp").glob("*.safetensors*")] == [out.name]  # the base's one file, no index
    assert (tmp_path / "tp" / "config.json").read_text() == (seeds / "base" / "config.json").read_text()
    stored = _header(out)
    assert set(stored) == set(masks)
    targets = 0
    for name, m in masks.items():
        target = any(f".{linear}." in name for linear in LINEARS)
        assert stored[name] == ("F32" if target else "BF16"), name
        merged = _numpy_tensor(seeds / "merged-seed0" / "model.safetensors", name)
        want = np.where(m, merged, _numpy_tensor(base_file, name)) if target else _numpy_tensor(base_file, name)
        assert np.array_equal(_numpy_tensor(out, name), want), name
        targets += target and 0 < m.sum() < m.size  # the mask takes some entries from the run, not all
    assert targets == 14


def _header(file: Path) -> dict[str, str]:
    raw = file.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    return {n: e["dtype"] for n, e in header.items() if n != "__metadata__"}


def _not_json(seeds, tmp_path):
    shutil.copytree(seeds / "lora-seed0", tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text("{r: 4,")
    return tmp_path / "bad", "adapter_config.json: is not valid JSON"


def _no_weights(seeds, tmp_path):
    shutil.copytree(seeds / "lora-seed0", tmp_path / "bad")
    (tmp_path / "bad" / "adapter_model.safetensors").unlink()
    return tmp_path / "bad", "has adapter_config.json but no adapter_model.safetensors"


def _module_not_in_base(seeds, tmp_path):
    other = write_base(tmp_path / "deeper", num_hidden_layers=3)
    write_adapter(other, tmp_path / "bad", lora(target_modules=["q_proj"]), 0)
    return tmp_path / "bad", "LoRA module 'model.layers.2.self_attn.q_proj' has no weight in the base"


def _shapes_do_not_fit(seeds, tmp_path):
    other = write_base(tmp_path / "wider", intermediate_size=64)
    write_adapter(other, tmp_path / "bad", lora(target_modules=["gate_proj"]), 0)
    return tmp_path / "bad", "does not fit the base: lora_B [64, 4] · lora_A [4, 32] cannot update"


def _dora(seeds, tmp_path):
    write_adapter(seeds / "base", tmp_path / "bad", lora(use_dora=True), 0)
    return tmp_path / "bad", "adapter_config.json: sets use_dora (True): DoRA"


def _not_lora(seeds, tmp_path):
    shutil.copytree(seeds / "lora-seed0", tmp_path / "bad")
    config = tmp_path / "bad" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "IA3"}))
    return tmp_path / "bad", "is a PEFT IA3 adapter (peft_type); only LoRA adapters are read"


def _rank_mismatch(seeds, tmp_path):
    shutil.copytree(seeds / "lora-seed0", tmp_path / "bad")
    config = tmp_path / "bad" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rank_pattern": {"k_proj": 2}}))
    return tmp_path / "bad", "has rank 4 but its adapter_config.json gives it r=2"


def _pissa(seeds, tmp_path):
    shutil.copytree(seeds / "lora-seed0", tmp_path / "bad")
    config = tmp_path / "bad" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "init_lora_weights": "pissa_niter_4"}))
    return tmp_path / "bad", "init_lora_weights 'pissa_niter_4' changed the base's weights"


@pytest.mark.parametrize("make", [_not_json, _no_weights, _module_not_in_base, _shapes_do_not_fit, _dora, _not_lora,
                                  _rank_mismatch, _pissa])
def test_bad_adapters_refused_in_one_sentence(seeds, tmp_path, capsys, make):
    """Each bad adapter: exit 2, one error line that names the file and what is wrong, no traceback, no output."""
    adapter, needle = make(seeds, tmp_path)
    code, _, err = run_cli(["analyze", seeds / "base", adapter, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("rlsub-tui: error:")]
    assert len(lines) == 1, err
    assert needle in lines[0] and str(adapter) in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
