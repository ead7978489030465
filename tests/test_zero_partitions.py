"""DeepSpeed ZeRO 1/2/3 checkpoints, written by DeepSpeed itself on CPU (tests/zero_writer.py), read as the fp32
masters: bit for bit what zero_to_fp32 gathers, the same analysis as its export, bad input refused in one sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reads import assert_reads_as
from reference import mask, round_bf16
from safetensors.torch import load_file

from rlsub_tui.checkpoints.checkpoint import open_checkpoint
from rlsub_tui.checkpoints.kinship import NOT_A_FINE_TUNE
from rlsub_tui.checkpoints.locate import locate
from rlsub_tui.checkpoints.zero_partitions import ZeroPartitions, load_states, zero3_slices, zero12_slices
from rlsub_tui.cli.main import main
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.util.errors import CheckpointError

# DeepSpeed writes the fixtures; it is in no extra (an sdist that needs torch to build): .ci/run installs it, as
# DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8 does; without it these are reported as skipped
pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install deepspeed to write the ZeRO fixtures")
ROOT = Path(__file__).resolve().parents[1]
TAG = "global_step2"


@pytest.fixture(scope="session")
def ds(tmp_path_factory) -> Path:
    """Everything tests/zero_writer.py writes (its docstring lists it), once per session."""
    out = tmp_path_factory.mktemp("zero")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    subprocess.run([sys.executable, str(ROOT / "tests" / "zero_writer.py"), str(out)], check=True, env=env,
                   timeout=600, capture_output=True)
    return out


def exported(ds: Path, stage: int, seed: int) -> dict[str, torch.Tensor]:
    return load_file(str(ds / "export" / f"z{stage}" / f"seed{seed}" / "model.safetensors"))


# --- reading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, stage, seed", [
    ("runs/z1/seed1", 1, 1),  # the save folder: `latest` names global_step2
    ("runs/z1/seed2", 1, 2),  # bf16 under DeepSpeed's ZeRO-1 optimizer
    (f"runs/z2/seed1/{TAG}", 2, 1),  # the tag folder itself
    (f"runs/z2/seed3/{TAG}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 2, 3),  # one rank's file; norm frozen
    ("runs/z3/seed2", 3, 2),
    (f"runs/z3/seed3/{TAG}/zero_pp_rank_0_mp_rank_00_model_states.pt", 3, 3),  # frozen norm in fragments by rank
])
def test_partitions_read_as_what_zero_to_fp32_gathers(ds, given, stage, seed):
    ckpt = open_checkpoint(str(ds / given))
    want = exported(ds, stage, seed)
    assert ckpt.layout == "zero" and ckpt.reader.stage == stage and ckpt.reader.world_size == 2
    assert sorted(ckpt.tensors) == sorted(want) and len(want) == 21
    assert any(t.numel() % 2 for t in want.values())  # a partition that does not divide evenly over two ranks
    for name, info in ckpt.tensors.items():
        full = want[name]
        frozen = seed == 3 and stage > 1 and name == "model.norm.weight"
        assert info.dtype == (torch.bfloat16 if frozen else torch.float32), name  # frozen: as stored
        assert info.shape == tuple(full.shape), name
        assert_reads_as(ckpt, name, full, 2)
    ckpt.close()


def test_flat_groups_stay_memory_mapped(ds):
    """Every rank's flat fp32 group lies in a mapping of its own file: a read copies one parameter only."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    reader = ZeroPartitions(locate(str(ds / "runs" / "z3" / "seed1")).files)
    mapped = [(int(lo, 16), int(hi, 16), parts[5]) for line in maps.read_text().splitlines()
              if len(parts := line.split(maxsplit=5)) == 6 for lo, hi in [parts[0].split("-")]]
    for optim in reader._optim:
        for g in optim.groups:
            assert any(lo <= g.data_ptr() < hi and path == str(optim.file) for lo, hi, path in mapped), optim.file
    t = reader.read("model.embed_tokens.weight")
    assert t.untyped_storage().nbytes() == t.numel() * 4


def test_deepspeed_records_are_stubs_and_the_allow_list_is_restored(ds):
    """LossScaler, fragment_address and ZeroStageEnum load as inert records even with DeepSpeed imported, and the
    user's allow-list is as it was afterwards."""
    import deepspeed.runtime.fp16.loss_scaler as ls

    torch.serialization.add_safe_globals([ls.LossScaler])
    before = set(torch.serialization.get_safe_globals())
    state = load_states(ds / "runs" / "z2" / "seed1" / TAG / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    osd = state["optimizer_state_dict"]
    assert type(osd["zero_stage"]).__name__ == "_ZeroStage" and osd["zero_stage"] == 2
    assert not isinstance(osd["loss_scaler"], ls.LossScaler)
    assert set(torch.serialization.get_safe_globals()) == before
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals([g for g in before if g is not ls.LossScaler])


def test_slices_follow_zero_to_fp32s_rules():
    """By hand: ZeRO-2 partitions [5, 4] hold a 6-element parameter from element 2 as 3 + 3; ZeRO-3 over 2 ranks of
    groups [3, 2] holds a 7-element parameter at offset 1 as ceil(7/2) = 4 elements per rank across both groups."""
    assert [(s.rank, s.start, s.length) for s in zero12_slices([5, 4], 2, 6)] == [(0, 2, 3), (1, 0, 3)]
    assert [(s.rank, s.group, s.start, s.length) for s in zero3_slices([3, 2], 1, 7, 2)] == \
        [(0, 0, 1, 2), (0, 1, 0, 2), (1, 0, 1, 2), (1, 1, 0, 2)]
    rng = np.random.default_rng(0)  # against numpy: partition random parameters as ZeRO-3 does and join them back
    for world in (1, 2, 3, 4):
        numels = rng.integers(0, 20, 6)
        parts = [-(-int(n) // world) for n in numels]
        values = [rng.standard_normal(int(n)) for n in numels]
        ranks = [np.concatenate([np.pad(v, (0, p * world - len(v)))[r * p:(r + 1) * p] for v, p in zip(values, parts)])
                 for r in range(world)]
        cut = len(ranks[0]) // 2
        groups = [[flat[:cut], flat[cut:]] for flat in ranks]
        offset = 0
        for v, p in zip(values, parts):
            got = np.concatenate([groups[s.rank][s.group][s.start:s.start + s.length]
                                  for s in zero3_slices([cut, len(ranks[0]) - cut], offset, len(v), world)] or
                                 [np.zeros(0)])
            assert np.array_equal(got[:len(v)], v)
            offset += p


def test_a_trainer_checkpoint_folder_is_read_from_its_masters(ds, tmp_path):
    """HF Trainer under ZeRO: checkpoint-N/ holds config.json, a bf16 model.safetensors, `latest` and global_stepN/;
    the fp32 masters win, and config.json is found beside the tag folder."""
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(ds / "runs" / "z2" / "seed1", folder)
    shutil.copy(ds / "base" / "config.json", folder)
    shutil.copy(ds / "base" / "model.safetensors", folder)
    ckpt = open_checkpoint(str(folder))
    assert ckpt.layout == "zero" and {i.dtype for i in ckpt.tensors.values()} == {torch.float32}
    assert ckpt.config()["model_type"] == "llama"
    (folder / "latest").write_text("global_step9")  # not a tag folder here: some other trainer's `latest`
    assert locate(str(folder)).layout == "safetensors"


def test_a_zero_run_of_another_architecture_is_warned_about(ds, tmp_path):
    """A Trainer folder around a ZeRO tag whose config.json names another model type (the base's names none of
    its architectures): that run, and only it, is warned about; with the base's own config.json beside it, no run."""
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(ds / "runs" / "z2" / "seed1", folder)
    config = json.loads((ds / "base" / "config.json").read_text())
    assert "architectures" not in config and config["model_type"] == "llama"
    for model_type, warned in (("mistral", 1), ("llama", 0)):
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        a = Analysis(str(ds / "base"), [str(ds / "export" / "z2" / "seed2"), str(folder)],
                     AnalysisOptions(use_cache=False))
        a.close()
        notes = [n for n in a.result.notes if NOT_A_FINE_TUNE in n]
        assert len(notes) == warned, a.result.notes
        assert all(n.startswith(f"run '{a.result.run_labels[1]}'") and "base llama, run mistral" in n for n in notes)


# --- the numbers: partitions and their export agree -----------------------------------------------------------

def analysed(base: Path, runs: list[Path]) -> Analysis:
    a = Analysis(str(base), [str(r) for r in runs], AnalysisOptions(compare_dtype="stored", use_cache=False))
    a.run_all()
    a.close()
    return a


@pytest.mark.parametrize("stage", [2, 3])
def test_analysis_of_the_partitions_is_the_analysis_of_their_export(ds, stage):
    from_zero = analysed(ds / "base", [ds / "runs" / f"z{stage}" / f"seed{s}" for s in (1, 2, 3)])
    from_export = analysed(ds / "base", [ds / "export" / f"z{stage}" / f"seed{s}" for s in (1, 2, 3)])
    a, b = from_zero.result, from_export.result
    assert not a.skipped and not b.skipped
    assert a.complete and b.complete and sorted(a.tensors) == sorted(b.tensors) and len(a.tensors) == 21
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        for ra, rb in zip(ta.runs, tb.runs):
            assert (ra.dtype, ra.true_dtype, ra.updated, ra.true_updated, ra.rank, ra.hidden_by_bf16) == \
                (rb.dtype, rb.true_dtype, rb.updated, rb.true_updated, rb.rank, rb.hidden_by_bf16), name
        assert ta.both == tb.both and ta.agreement == tb.agreement, name
    assert sum(r.true_updated or 0 for t in a.tensors.values() for r in t.runs) > 0  # the frozen bf16 norm: None
    assert None not in [r.rank for t in a.tensors.values() if len(t.shape) == 2 for r in t.runs]
    sa, sb = a.stats(), b.stats()
    for i in range(3):
        for j in range(i + 1, 3):
            assert sa.pair(i, j) == sb.pair(i, j)


def numpy_masters(tag: Path) -> dict[str, np.ndarray]:
    """A ZeRO-1/2 save merged by numpy from DeepSpeed's own files (ours, loaded in full): each flat fp32 group is the
    ranks' partitions in rank order, holding param_shapes' parameters in turn, each followed by its alignment padding
    where the optimizer records one; a parameter the optimizer does not hold is in the module, whole, as trained."""
    model = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    ranks = [torch.load(tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             ["optimizer_state_dict"] for r in range(2)]
    out = {}
    for g, shapes in enumerate(model["param_shapes"]):
        flat = np.concatenate([r["single_partition_of_fp32_groups"][g].detach().numpy() for r in ranks])
        paddings = (ranks[0].get("param_alignment_paddings") or [[0] * len(shapes)])[g]
        at = 0
        for (name, shape), pad in zip(shapes.items(), paddings):
            n = int(np.prod(shape))
            out[name] = flat[at:at + n].reshape(tuple(shape))
            at += n + pad
    for name, t in model["module"].items():
        out.setdefault(name, t.float().numpy())
    return out


def test_bf16_zero1_counts_are_those_of_a_numpy_merge(ds):
    """bf16 ZeRO-1 under both of DeepSpeed's optimizers: its ZeRO-1 optimizer (seed 2) and BF16_Optimizer (seed 3, fp32
    gradient accumulation; no zero_stage recorded, zero_to_fp32 refuses it, and it lists no frozen parameters: the
    frozen norm is only in the module). The masters read bit for bit as numpy merges them, and the updated counts
    (in bf16, the less precise of the pair) and true ones (in fp32) are numpy's on them."""
    runs = [ds / "runs" / "z1" / f"seed{s}" for s in (2, 3)]
    merged = [numpy_masters(r / TAG) for r in runs]
    assert "zero_stage" not in torch.load(next((runs[1] / TAG).glob("*optim_states.pt")),
                                          weights_only=False)["optimizer_state_dict"]
    base = {n: t.float().numpy() for n, t in load_file(str(ds / "base" / "model.safetensors")).items()}
    for run, want in zip(runs, merged):
        ckpt = open_checkpoint(str(run))
        assert ckpt.reader.stage == 1 and sorted(ckpt.tensors) == sorted(want) == sorted(base) and len(base) == 21
        for name, values in want.items():
            assert np.array_equal(ckpt.read(name).float().numpy(), values), (run, name)
        ckpt.close()
    assert ckpt.tensors["model.norm.weight"].dtype == torch.bfloat16  # BF16_Optimizer's frozen norm, as stored
    result = analysed(ds / "base", runs).result
    assert result.complete and not result.skipped and len(result.tensors) == 21
    moved = 0
    for name, t in result.tensors.items():
        seen = [mask(base[name], round_bf16(m[name]), "bf16") for m in merged]
        for j, (r, m) in enumerate(zip(t.runs, merged)):
            fine = m[name].dtype == np.float32 and not (j == 1 and name == "model.norm.weight")
            true = mask(base[name], m[name], "fp32") if fine else None
            assert r.dtype == "bf16" and r.updated == int(seen[j].sum()), (name, j)
            assert r.true_updated == (int(true.sum()) if fine else None), (name, j)
            moved += r.true_updated or 0
        assert t.both[(0, 1)] == int((seen[0] & seen[1]).sum()), name
    assert moved > 0 and result.tensors["model.norm.weight"].runs[1].updated == 0


# --- bad input ---------------------------------------------------------------------------------------------------

def copy_tag(ds: Path, tmp_path: Path, run: str = "runs/z2/seed1") -> Path:
    tag = tmp_path / "bad" / TAG
    shutil.copytree(ds / run / TAG, tag)
    return tag


def optim(tag: Path, rank: int) -> Path:
    return next(tag.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))


def truncated(tag: Path) -> None:
    f = optim(tag, 1)
    os.truncate(f, f.stat().st_size // 2)


def third_rank(tag: Path) -> None:
    shutil.copy(optim(tag, 1), tag / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")


def short_partition(tag: Path) -> None:
    state = torch.load(optim(tag, 1), weights_only=False)  # our own file, trusted here
    groups = state["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    groups[0] = groups[0][:-100].clone()
    torch.save(state, optim(tag, 1))


@pytest.mark.parametrize("spoil, needles", [
    (truncated, ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncated"]),
    (lambda t: optim(t, 1).unlink(), [TAG, "rank 1's optimizer states are missing",
                                      "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "2 ranks"]),
    (third_rank, ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "partition_count 2", "3 optimizer states"]),
    (short_partition, ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "do not"]),
    (lambda t: (t / "mp_rank_00_model_states.pt").unlink(), [TAG, "no mp_rank_00_model_states.pt"]),
])
def test_a_spoilt_save_is_refused_in_one_sentence(ds, tmp_path, capsys, spoil, needles):
    tag = copy_tag(ds, tmp_path)
    spoil(tag)
    assert_refused(tmp_path, ds, tag, capsys, *needles)


def test_a_zero3_rank_without_its_model_states_is_refused(ds, tmp_path, capsys):
    tag = copy_tag(ds, tmp_path, "runs/z3/seed3")  # frozen norm: each rank's model states hold its fragment
    (tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    assert_refused(tmp_path, ds, tag, capsys, TAG, "rank 1's model states are missing", "frozen")


def test_a_pickle_that_would_run_code_is_refused_and_not_run(ds, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tag = copy_tag(ds, tmp_path)
    state = torch.load(optim(tag, 1), weights_only=False)  # our own file, trusted here
    state["optimizer_state_dict"]["clip_grad"] = Payload()
    torch.save(state, optim(tag, 1))
    assert_refused(tmp_path, ds, tag, capsys, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "refused", "system",
                   "nothing in it was run")
    assert not marker.exists()


def test_model_parallel_ranks_are_refused(ds, tmp_path):
    tag = copy_tag(ds, tmp_path)
    shutil.copy(optim(tag, 0), tag / "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt")
    with pytest.raises(CheckpointError, match="model-parallel rank 1"):
        open_checkpoint(str(tag))


def assert_refused(tmp_path: Path, ds: Path, run: Path, capsys, *needles: str) -> None:
    code = main(["analyze", str(ds / "base"), str(run), "--out", str(tmp_path / "out"), "--quiet", "--no-cache"])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("rlsub-tui: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- a transplant of the partitions -----------------------------------------------------------------------------

def widened(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor's values as float32, by numpy from its bits."""
    return (t.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("stage, seed", [(3, 2), (2, 3)])
def test_a_transplant_of_the_partitions_is_a_hugging_face_checkpoint(ds, tmp_path, capsys, stage, seed):
    """One model.safetensors under the base's names: zero_to_fp32's gathered master where the mask is true and the
    base elsewhere, each tensor in the run's stored dtype (float32 masters; a frozen parameter as stored)."""
    run, masks_file, out = ds / "runs" / f"z{stage}" / f"seed{seed}", tmp_path / "mask.safetensors", tmp_path / "t"
    for args in (["masks", ds / "base", run, "--out", masks_file],
                 ["transplant", ds / "base", run, "--mask", masks_file, "--out", out]):
        code = main([str(a) for a in args] + ["--quiet"])
        assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "transplant.json"]
    # DeepSpeed's save holds no config.json: the base's, naming the dtype the masters are written in, so that
    # transformers loads the transplant as the model it is, in float32
    config, base_config = (json.loads(p.read_text()) for p in (out / "config.json", ds / "base" / "config.json"))
    key = "dtype" if "dtype" in base_config else "torch_dtype"  # as transformers >= 4.56 and earlier name it
    assert base_config[key] == "bfloat16" and config == {**base_config, key: "float32"}
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    got, base = load_file(str(out / "model.safetensors")), load_file(str(ds / "base" / "model.safetensors"))
    masks, gathered = load_file(str(masks_file)), exported(ds, stage, seed)
    assert sorted(got) == sorted(base) == sorted(masks) == sorted(gathered)
    taken = 0
    for name, m in masks.items():
        frozen = seed == 3 and name == "model.norm.weight"
        assert got[name].dtype == (torch.bfloat16 if frozen else torch.float32), name
        if frozen:
            assert not m.any() and torch.equal(got[name], base[name]), name
            continue
        want = np.where(m.numpy(), gathered[name].numpy(), widened(base[name]))
        assert np.array_equal(got[name].numpy(), want), name
        assert np.array_equal(loaded[name].numpy(), want), name
        taken += int(m.sum())
    assert 0 < taken < sum(m.numel() for m in masks.values())
    assert json.loads((out / "transplant.json").read_text())["mask_true"] == taken
