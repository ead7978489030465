"""The mask file and the transplant, checked against numpy on the same arrays and against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synthetic import base_state, save, sparse_run

from rlsub_tui.cli.main import main
from rlsub_tui.compute.kernels import update_mask
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.compute.transplant import random_mask
from rlsub_tui.records.criteria import Criterion

NP_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("rlsub-tui: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def raw_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all shards)."""
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


@pytest.fixture
def three(tmp_path):
    """A bf16 base and three runs: run 0 sharded in two files, the others single files."""
    b = base_state()
    save(b, tmp_path / "base")
    runs = [sparse_run(b, s) for s in range(3)]
    save(runs[0], tmp_path / "r0", layout="sharded")
    save(runs[1], tmp_path / "r1")
    save(runs[2], tmp_path / "r2")
    (tmp_path / "r0" / "tokenizer_config.json").write_text('{"x": 1}')
    (tmp_path / "r0" / "optimizer.pt").write_bytes(b"not copied")
    return tmp_path, b, runs


# --- update_mask: the criterion as one bool tensor -------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(list(NP_DTYPE)),
       criterion=st.sampled_from([Criterion("atol", 1e-5), Criterion("exact", 0.0), Criterion("relative", 1e-3),
                                  Criterion("atol", 3e-3)]))
def test_update_mask_matches_numpy(seed, dtype, criterion):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(37, 29, generator=g) * 0.05).to(dtype)
    step = torch.randn(37, 29, generator=g) * torch.rand(37, 29, generator=g).pow(6) * 1e-2
    run = (base.float() + step).to(dtype)
    run[0, 0] = float("nan")
    base[1, 1] = float("inf")
    got = update_mask(base, run, criterion).numpy()
    want = reference.mask(base.float().numpy(), run.float().numpy(), NP_DTYPE[dtype], criterion.name,
                          criterion.value)
    np.testing.assert_array_equal(got, want)
    assert int(got.sum()) == compute_tensor(base, [run], criterion, want_rank=False).runs[0].updated


# --- the mask file -----------------------------------------------------------------------------------------------

def expected_masks(base: dict, runs: list[dict], criterion="atol", value=1e-5) -> list[dict[str, np.ndarray]]:
    return [{n: reference.mask(base[n].float().numpy(), r[n].float().numpy(), "bf16", criterion, value)
             for n in base} for r in runs]


def test_consensus_and_at_least_j_masks_match_numpy(three, capsys):
    tmp, b, runs = three
    want = expected_masks(b, runs)
    for j in (None, 1, 2):
        out = tmp / f"m{j}.safetensors"
        extra = [] if j is None else ["--min-runs", j]
        code, text, err = cli(["masks", tmp / "base", tmp / "r0", tmp / "r1", tmp / "r2", "--out", out,
                               "--quiet", *extra], capsys)
        assert code == 0, err
        masks = load_file(str(out))
        assert set(masks) == set(b)
        need = 3 if j is None else j
        true = 0
        for name, m in masks.items():
            assert m.dtype == torch.bool and tuple(m.shape) == tuple(b[name].shape)
            votes = sum(w[name].astype(np.int64) for w in want)
            np.testing.assert_array_equal(m.numpy(), votes >= need)
            true += int((votes >= need).sum())
        with safe_open(str(out), "pt") as fh:
            meta = fh.metadata()
        assert meta["criterion"] == "atol" and float(meta["tolerance"]) == 1e-5
        assert meta["mode"] == ("consensus" if need == 3 else "at-least") and meta["min_runs"] == str(need)
        assert [r["label"] for r in json.loads(meta["runs"])] == ["r0", "r1", "r2"]
        counts = json.loads(meta["counts"])
        assert counts == {"numel": sum(t.numel() for t in b.values()), "true": {"None": true}}
        assert f"{true} of {counts['numel']}" in text


def test_per_run_masks_and_fingerprint(three, capsys):
    tmp, b, runs = three
    out = tmp / "per.safetensors"
    code, _, err = cli(["masks", tmp / "base", f"first={tmp / 'r0'}", tmp / "r1", "--per-run", "--criterion",
                        "relative", "--eta", "1e-3", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    masks = load_file(str(out))
    want = expected_masks(b, runs[:2], "relative", 1e-3)
    assert set(masks) == {f"{lbl}/{n}" for lbl in ("first", "r1") for n in b}
    for lbl, w in zip(("first", "r1"), want):
        for n in b:
            np.testing.assert_array_equal(masks[f"{lbl}/{n}"].numpy(), w[n])
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    recorded = json.loads(meta["base_tensors"])
    import hashlib
    for n, t in b.items():
        digest = hashlib.sha256(t.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:32]
        assert recorded[n] == ["BF16", list(t.shape), digest]
    assert json.loads(meta["counts"])["true"] == {lbl: int(sum(w[n].sum() for n in b))
                                                   for lbl, w in zip(("first", "r1"), want)}


def test_mask_file_is_atomic_and_not_overwritten(three, capsys, monkeypatch):
    tmp, _, _ = three
    out = tmp / "m.safetensors"
    out.write_bytes(b"precious")
    code, _, err = cli(["masks", tmp / "base", tmp / "r1", "--out", out, "--quiet"], capsys)
    refused(code, err, str(out), "--force")
    assert out.read_bytes() == b"precious"

    import rlsub_tui.compute.maskfile as maskfile
    calls = []

    def failing(base, run, criterion):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return update_mask(base, run, criterion)

    monkeypatch.setattr(maskfile, "update_mask", failing)
    code, _, err = cli(["masks", tmp / "base", tmp / "r1", "--out", out, "--quiet", "--force"], capsys)
    assert code == 1 and "No space left" in err
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("args, needles", [
    (["--min-runs", "3"], ["--min-runs 3", "between 1 and"]),
    (["--min-runs", "0"], ["--min-runs 0"]),
    (["--min-runs", "1", "--per-run"], ["--per-run"]),
])
def test_mask_options_refused(three, capsys, args, needles):
    tmp, _, _ = three
    out = tmp / "m.safetensors"
    code, _, err = cli(["masks", tmp / "base", tmp / "r1", tmp / "r2", "--out", out, *args], capsys)
    refused(code, err, *needles)
    assert not out.exists()


def test_mask_out_refused(three, capsys):
    tmp, _, _ = three
    for out, needle in [(tmp / "m.bin", "name a .safetensors file"), (tmp / "nowhere" / "m.safetensors", "does not exist"),
                        (tmp / "r1" / "model.safetensors", "input checkpoints' files")]:
        code, _, err = cli(["masks", tmp / "base", tmp / "r1", "--out", out, "--force"], capsys)
        refused(code, err, needle)


# --- the transplant ----------------------------------------------------------------------------------------------

def test_own_exact_mask_reproduces_the_run_bit_for_bit(three, capsys):
    tmp, b, runs = three
    mask = tmp / "own.safetensors"
    assert cli(["masks", tmp / "base", tmp / "r0", tmp / "r1", "--per-run", "--criterion", "exact",
                "--out", mask, "--quiet"], capsys)[0] == 0
    code, text, err = cli(["transplant", tmp / "base", tmp / "r0", "--mask", mask, "--mask-run", "r0",
                           "--out", tmp / "t", "--quiet"], capsys)
    assert code == 0, err
    out = tmp / "t"
    # sharded like the run: same shard files, same tensors in each, an index naming them
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in (tmp / "r0").glob("*.safetensors"))
    for shard in (tmp / "r0").glob("*.safetensors"):
        got, want = load_file(str(out / shard.name)), load_file(str(shard))
        assert set(got) == set(want)
        for n in want:
            assert got[n].dtype == want[n].dtype
            np.testing.assert_array_equal(bits(got[n]), bits(want[n]))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((tmp / "r0" / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").read_text() == '{"x": 1}'
    assert not (out / "optimizer.pt").exists()
    record = json.loads((out / "transplant.json").read_text())
    changed = sum(int((bits(runs[0][n]) != bits(b[n])).sum()) for n in b)
    assert record["mask_true"] == record["changed_from_base"] == record["run_differs_from_base"] == changed
    assert f"run changed {changed}" in text


def test_empty_mask_reproduces_the_base(three, capsys):
    tmp, b, _ = three
    mask = tmp / "none.safetensors"
    assert cli(["masks", tmp / "base", tmp / "r1", "--tolerance", "1e3", "--out", mask, "--quiet"], capsys)[0] == 0
    assert not any(m.any() for m in load_file(str(mask)).values())
    assert cli(["transplant", tmp / "base", tmp / "r1", "--mask", mask, "--out", tmp / "t", "--quiet"], capsys)[0] == 0
    got = raw_state(tmp / "t")
    assert set(got) == set(b)
    for n in b:
        np.testing.assert_array_equal(bits(got[n]), bits(b[n]))


def test_consensus_transplant_and_random_control(three, capsys):
    tmp, b, runs = three
    mask = tmp / "cons.safetensors"
    assert cli(["masks", tmp / "base", tmp / "r0", tmp / "r1", tmp / "r2", "--out", mask, "--quiet"], capsys)[0] == 0
    masks = load_file(str(mask))
    code, text, err = cli(["transplant", tmp / "base", tmp / "r2", "--mask", mask, "--out", tmp / "t",
                           "--random-control", "7", "--quiet"], capsys)
    assert code == 0, err
    got, ctrl = raw_state(tmp / "t"), raw_state(tmp / "t-random7")
    hits = 0
    for n in b:
        m = masks[n].numpy()
        want = np.where(m, runs[2][n].float().numpy(), b[n].float().numpy())
        np.testing.assert_array_equal(got[n].float().numpy(), want)
        # the control takes the run's value on as many positions, and the base's elsewhere
        takes_run = bits(ctrl[n]) == bits(runs[2][n])
        assert np.all(takes_run | (bits(ctrl[n]) == bits(b[n])))
        control_mask = random_mask(tuple(m.shape), int(m.sum()), 7, n).numpy()
        assert control_mask.sum() == m.sum()
        np.testing.assert_array_equal(ctrl[n].float().numpy(),
                                      np.where(control_mask, runs[2][n].float().numpy(), b[n].float().numpy()))
        hits += int((control_mask & m).sum())
    total = sum(int(m.sum()) for m in masks.values())
    assert hits < 0.6 * total  # a random mask of the same size does not find the consensus
    record = json.loads((tmp / "t-random7" / "transplant.json").read_text())
    assert record["kind"] == "random-control" and record["random_control_seed"] == 7
    assert record["mask_true"] == total


def test_random_mask_is_uniform_exact_and_reproducible():
    shape = (300, 1000)
    a = random_mask(shape, 30_000, 1, "w")
    assert int(a.sum()) == 30_000
    assert torch.equal(a, random_mask(shape, 30_000, 1, "w"))
    assert not torch.equal(a, random_mask(shape, 30_000, 2, "w"))
    assert not torch.equal(a, random_mask(shape, 30_000, 1, "v"))
    # uniform: every row holds about 100 hits (binomial sd ~9.5), the counts pass a chi-square test
    rows = a.sum(dim=1).numpy()
    chi2 = float(((rows - 100.0) ** 2 / 100.0).sum())
    assert 200 < chi2 < 420, chi2  # 299 degrees of freedom: 99.9% interval
    assert int(random_mask((5,), 0, 1, "w").sum()) == 0 and bool(random_mask((5,), 5, 1, "w").all())


def test_transformers_loads_the_transplant(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.rand_like(p, dtype=torch.float32) < 0.2) * torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "run", max_shard_size="40KB")
    assert len(list((tmp_path / "run").glob("*.safetensors"))) > 1
    mask = tmp_path / "mask.safetensors"
    assert cli(["masks", tmp_path / "base", tmp_path / "run", "--out", mask, "--quiet"], capsys)[0] == 0
    code, _, err = cli(["transplant", tmp_path / "base", tmp_path / "run", "--mask", mask, "--out",
                        tmp_path / "t", "--random-control", "1", "--quiet"], capsys)
    assert code == 0, err
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16)
    masks = load_file(str(mask))
    run_state = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run", torch_dtype=torch.bfloat16).state_dict()
    base_state_ = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.bfloat16).state_dict()
    for n, t in loaded.state_dict().items():
        want = torch.where(masks[n], run_state[n], base_state_[n])
        assert torch.equal(t, want), n
    control = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t-random1", torch_dtype=torch.bfloat16)
    out = control(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 96) and torch.isfinite(out).all()


# --- bad input -------------------------------------------------------------------------------------------------

def test_transplant_refuses_bad_masks_and_outputs(three, capsys):
    tmp, b, _ = three
    mask = tmp / "m.safetensors"
    assert cli(["masks", tmp / "base", tmp / "r1", "--out", mask, "--quiet"], capsys)[0] == 0

    other = {n: t for n, t in base_state(seed=5).items()}
    save(other, tmp / "other-base")
    small = {"model.norm.weight": torch.zeros(32, dtype=torch.bool), "extra.weight": torch.zeros(3, dtype=torch.bool)}
    save_file(small, str(tmp / "names.safetensors"))
    save_file({"model.norm.weight": torch.zeros(31, dtype=torch.bool)}, str(tmp / "shape.safetensors"))
    save_file({"model.norm.weight": torch.zeros(32)}, str(tmp / "float.safetensors"))
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("mine")
    (tmp / "t-full").mkdir()
    (tmp / "t-full" / "x").write_text("x")
    cases = [
        (["--mask", tmp / "names.safetensors", "--out", tmp / "t"], ["extra.weight", "another model"]),
        (["--mask", tmp / "shape.safetensors", "--out", tmp / "t"], ["shape [31]", "[32]"]),
        (["--mask", tmp / "float.safetensors", "--out", tmp / "t"], ["not a bool mask"]),
        (["--mask", tmp / "nope.safetensors", "--out", tmp / "t"], ["no such file"]),
        (["--mask", mask, "--out", tmp / "r1" / "t"], ["input checkpoint directory"]),
        (["--mask", mask, "--out", tmp / "base"], ["input checkpoint directory"]),
        (["--mask", mask, "--out", tmp, "--force"], ["input checkpoint directory"]),
        (["--mask", mask, "--out", tmp / "t-full"], ["not empty", "--force"]),
        (["--mask", mask, "--out", tmp / "foreign", "--force"], ["did not write"]),
        (["--mask", mask, "--out", tmp / "t", "--mask-run", "r1"], ["one combined mask"]),
        (["--mask", mask, "--out", tmp / "t", "--random-control", "-1"], ["non-negative"]),
    ]
    for extra, needles in cases:
        code, _, err = cli(["transplant", tmp / "base", tmp / "r1", *extra], capsys)
        refused(code, err, *needles)
    assert not (tmp / "t").exists()
    assert (tmp / "foreign" / "notes.txt").read_text() == "mine" and (tmp / "t-full" / "x").is_file()
    # a mask from another base of the same shapes: found by the recorded digests, nothing left behind
    code, _, err = cli(["transplant", tmp / "other-base", tmp / "r1", "--mask", mask, "--out", tmp / "t",
                        "--random-control", "1"], capsys)
    refused(code, err, str(mask), "different base")
    assert not (tmp / "t").exists() and not (tmp / "t-random1").exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


def test_transplant_replaces_an_earlier_one_with_force(three, capsys):
    tmp, b, runs = three
    mask = tmp / "m.safetensors"
    assert cli(["masks", tmp / "base", tmp / "r1", "--out", mask, "--quiet"], capsys)[0] == 0
    assert cli(["transplant", tmp / "base", tmp / "r1", "--mask", mask, "--out", tmp / "t", "--quiet"], capsys)[0] == 0
    (tmp / "t" / "stale.txt").write_text("old")
    assert cli(["transplant", tmp / "base", tmp / "r1", "--mask", mask, "--out", tmp / "t", "--quiet",
                "--force"], capsys)[0] == 0
    assert not (tmp / "t" / "stale.txt").exists() and (tmp / "t" / "model.safetensors").is_file()


def test_readme_freeze_example_keeps_everything_outside_the_mask(tmp_path, capsys):
    """Run docs/subnetwork.md's gradient-hook block on a tiny model: entries outside the mask never move."""
    transformers = pytest.importorskip("transformers")
    text = (Path(__file__).parent.parent / "docs" / "subnetwork.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 12
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = raw_state(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(t.shape, generator=g) < 0.3 for n, t in base.items() if n != "model.norm.weight"}
    save_file(masks, str(tmp_path / "mask.safetensors"))
    scope = {"base_dir": str(tmp_path / "base"), "mask_file": str(tmp_path / "mask.safetensors")}
    exec(block, scope)
    model, optimizer = scope["model"], scope["optimizer"]
    for group in optimizer.param_groups:
        group["lr"] = 1e-2  # large enough that bf16 storage shows every step
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = 0
    for name, p in model.named_parameters():
        before, after = bits(base[name]), bits(p.detach())
        if name in masks:
            assert np.array_equal(before[~masks[name].numpy()], after[~masks[name].numpy()]), name
            moved += int((before != after).sum())
        else:
            assert np.array_equal(before, after), name
    assert moved > 1000


@pytest.mark.parametrize("layout", ["bin-sharded", "bin", "file"])
def test_transplant_of_pickled_and_single_file_runs(tmp_path, capsys, layout):
    b = base_state()
    save(b, tmp_path / "base")
    run = sparse_run(b, 3)
    written = save(run, tmp_path / "run", layout=layout)
    mask = tmp_path / "m.safetensors"
    assert cli(["masks", tmp_path / "base", f"r={written}", "--per-run", "--criterion", "exact", "--out", mask,
                "--quiet"], capsys)[0] == 0
    code, _, err = cli(["transplant", tmp_path / "base", written, "--mask", mask, "--out", tmp_path / "t",
                        "--quiet"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    expected = {"bin-sharded": ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                "model.safetensors.index.json", "transplant.json"],
                "bin": ["config.json", "model.safetensors", "transplant.json"],
                "file": ["transplant.json", "weights.safetensors"]}[layout]
    assert names == expected
    got = raw_state(tmp_path / "t")
    assert set(got) == set(run)
    for n in run:
        np.testing.assert_array_equal(bits(got[n]), bits(run[n]))
    if layout == "bin-sharded":
        index = json.loads((tmp_path / "t" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_fp32_base_bf16_run_and_a_moved_base(tmp_path, capsys):
    """Mixed dtypes compare in bf16 and write bf16; the base is known by its bytes, not its path."""
    b32 = base_state(dtype=torch.float32)
    save(b32, tmp_path / "base")
    run = sparse_run({n: t.to(torch.bfloat16) for n, t in b32.items()}, 2)
    save(run, tmp_path / "run")
    mask = tmp_path / "m.safetensors"
    assert cli(["masks", tmp_path / "base", tmp_path / "run", "--per-run", "--criterion", "exact", "--out", mask,
                "--quiet"], capsys)[0] == 0
    import shutil
    shutil.copytree(tmp_path / "base", tmp_path / "moved-base")
    code, _, err = cli(["transplant", tmp_path / "moved-base", tmp_path / "run", "--mask", mask, "--out",
                        tmp_path / "t", "--quiet"], capsys)
    assert code == 0, err
    got = raw_state(tmp_path / "t")
    for n in run:
        assert got[n].dtype == torch.bfloat16
        np.testing.assert_array_equal(bits(got[n]), bits(run[n]))
