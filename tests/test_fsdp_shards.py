"""verl's FSDP rank files, written by torch's own FSDP2 on CPU (tests/fsdp_writer.py), read as the global tensors:
bit for bit the tensors torch gathers itself, the same analysis as their safetensors export, bad input refused."""

from __future__ import annotations

import csv
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
from reference import round_bf16
from safetensors.torch import load_file, save_file

from rlsub_tui.checkpoints import fsdp_shards
from rlsub_tui.checkpoints.checkpoint import open_checkpoint
from rlsub_tui.checkpoints.fsdp_shards import FsdpShards, load_rank, shard_box
from rlsub_tui.checkpoints.kinship import NOT_A_FINE_TUNE, RELATIVE_NORM_LIMIT, distance_warnings
from rlsub_tui.checkpoints.labels import run_labels
from rlsub_tui.checkpoints.locate import locate
from rlsub_tui.checkpoints.names import canonical
from rlsub_tui.checkpoints.step_folders import find_timeline
from rlsub_tui.cli.main import main
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.util.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
LAST = "global_step_20"


@pytest.fixture(scope="session")
def verl(tmp_path_factory) -> Path:
    """Everything tests/fsdp_writer.py writes (its docstring lists it), once per session."""
    out = tmp_path_factory.mktemp("verl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_writer.py"), str(out)], check=True, env=env, timeout=300)
    return out


def gathered(verl: Path, seed: int, step: str = LAST) -> dict[str, torch.Tensor]:
    """torch's own full_tensor() of a save, by canonical name."""
    return {canonical(n): t for n, t in load_file(str(verl / "export" / f"seed{seed}" / step / "model.safetensors")).items()}


# --- reading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, seed, step", [
    (f"runs/seed1/{LAST}", 1, LAST),  # a step folder: its actor/ shards, not actor/huggingface
    ("runs/seed3/global_step_10/actor", 3, "global_step_10"),  # names with FSDP1's _fsdp_wrapped_module wrappers
    (f"runs/seed2/{LAST}/actor/model_world_size_2_rank_1.pt", 2, LAST),  # one rank's file names its save
    ("w1/actor", 1, LAST),  # world size 1: plain tensors
    ("mesh2d/actor", 2, LAST),  # 2 x 2 ("ddp", "fsdp") mesh: (Replicate(), Shard(0)), W = 4
])
def test_shards_read_as_the_tensors_torch_gathers(verl, given, seed, step):
    ckpt = open_checkpoint(str(verl / given))
    want = gathered(verl, seed, step)
    assert ckpt.layout == "fsdp" and all(f.suffix == ".pt" for f in ckpt.files)
    assert sorted(canonical(n) for n in ckpt.tensors) == sorted(want)
    assert any(want[k].shape[0] % 2 for k in want)  # uneven shards, and logit_scale's empty one on rank 1
    for name, info in ckpt.tensors.items():
        full = want[canonical(name)]
        assert info.dtype == torch.float32 and info.shape == tuple(full.shape), name
        assert ckpt.read(name).dtype == torch.float32, name
        assert_reads_as(ckpt, name, full, 4)
    ckpt.close()


def test_every_shard_stays_memory_mapped(verl):
    """Each rank's local shards lie in a mapping of its own file: reading a tensor copies only that tensor."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    actor = verl / "runs" / "seed1" / LAST / "actor"
    reader = FsdpShards(sorted(actor.glob("model_world_size_2_rank_*.pt")))
    mapped = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            mapped.append((lo, hi, parts[5]))
    for file, state in zip(reader.files, reader._ranks):
        for name, value in state.items():
            local = value.local if isinstance(value, fsdp_shards.LocalShard) else value
            if local.numel():
                ptr = local.data_ptr()
                assert any(lo <= ptr < hi and path == str(file) for lo, hi, path in mapped), (file.name, name)
    t = reader.read("model.embed_tokens.weight")
    assert t.untyped_storage().nbytes() == t.numel() * 4  # a tensor of its own, nothing else kept with it


def test_dtensor_stubs_win_over_the_real_classes(verl):
    """torch.distributed.tensor, once imported, allow-lists the real DTensor and DeviceMesh (whose unpickling
    looks up process groups) under the same names: while a shard loads, only our records are allowed, and the
    user's allow-list is as it was afterwards."""
    import torch.distributed.tensor  # noqa: F401

    before = set(torch.serialization.get_safe_globals())
    assert torch.distributed.tensor.DTensor in before
    state = load_rank(verl / "runs" / "seed1" / LAST / "actor" / "model_world_size_2_rank_1.pt")
    shard = state["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(shard, fsdp_shards.LocalShard) and type(shard.local) is torch.Tensor
    assert (shard.shape, shard.mesh_shape, shard.coordinate, shard.saved_rank) == ((48, 75), (2,), (1,), 1)
    assert tuple(shard.local.shape) == (24, 75) and shard.dtype == torch.float32
    assert set(torch.serialization.get_safe_globals()) == before


@pytest.mark.parametrize("length", range(0, 10))
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_a_shard_is_the_torch_chunk_of_its_rank(length, ranks):
    """Shard(d) splits as torch.chunk does, the ranks past its last chunk holding empty shards."""
    shard = fsdp_shards._Shard()
    shard.dim = 0
    chunks = list(torch.arange(length).chunk(ranks)) if length else []
    chunks += [torch.arange(0)] * (ranks - len(chunks))
    at = 0
    for rank, chunk in enumerate(chunks):
        offsets, sizes = shard_box((length, 3), (shard,), (ranks,), (rank,))
        assert sizes == (len(chunk), 3) and (offsets[0] == at or not len(chunk)), (rank, offsets, sizes)
        at += len(chunk)


def test_shards_over_two_mesh_dimensions_nest_in_mesh_order():
    """(Shard(0), Shard(1)) and (Shard(0), Shard(0)) on a 2 x 2 mesh: each mesh dimension splits what the one
    before left to the rank."""
    s0, s1, rep = fsdp_shards._Shard(), fsdp_shards._Shard(), fsdp_shards._Replicate()
    s0.dim, s1.dim = 0, 1
    full = torch.arange(7 * 5).reshape(7, 5)
    for placements, want in (((s0, s1), {(0, 0): full[:4, :3], (0, 1): full[:4, 3:], (1, 0): full[4:, :3],
                                         (1, 1): full[4:, 3:]}),
                             ((s0, s0), {(0, 0): full[:2], (0, 1): full[2:4], (1, 0): full[4:6], (1, 1): full[6:]}),
                             ((rep, s0), {(0, 0): full[:4], (0, 1): full[4:], (1, 0): full[:4], (1, 1): full[4:]})):
        for coordinate, piece in want.items():
            offsets, sizes = shard_box((7, 5), placements, (2, 2), coordinate)
            got = full[offsets[0]:offsets[0] + sizes[0], offsets[1]:offsets[1] + sizes[1]]
            assert torch.equal(got, piece), (placements, coordinate)


def test_fsdp1_wrapper_names_match_the_base():
    assert canonical("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight") == \
        canonical("model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert canonical("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj.weight") == \
        "layers.1.self_attn.q_proj.weight"
    assert canonical("model.my_fsdp_wrapped_module.x") == "my_fsdp_wrapped_module.x"


# --- where verl keeps them ---------------------------------------------------------------------------------------

def test_a_global_step_folder_is_read_from_its_actor_shards(verl):
    step = verl / "runs" / "seed1" / LAST
    found = locate(str(step))
    assert found.layout == "fsdp" and found.path == step
    assert found.files == [step / "actor" / f"model_world_size_2_rank_{r}.pt" for r in (0, 1)]
    hf = open_checkpoint(str(step / "actor" / "huggingface"))  # named by the user: the bf16 copy it holds
    assert hf.layout == "safetensors" and {i.dtype for i in hf.tensors.values()} == {torch.bfloat16}
    shards = open_checkpoint(str(step))
    assert {i.dtype for i in shards.tensors.values()} == {torch.float32}
    assert shards.config()["model_type"] == "llama"  # from actor/huggingface/config.json
    assert run_labels([str(step), str(verl / "runs" / "seed2" / LAST / "actor"),
                       str(verl / "runs" / "seed3" / LAST / "actor" / "model_world_size_2_rank_0.pt")]) == \
        ["seed1", "seed2", "seed3"]
    with pytest.raises(CheckpointError, match="2 checkpoint folder"):  # a run folder named as one checkpoint lists its steps
        locate(str(verl / "runs" / "seed1"))


def test_a_run_folder_of_global_steps_is_a_timeline_of_shards(verl, tmp_path, capsys):
    t = find_timeline(str(verl / "runs" / "seed1"))
    assert t.steps == [10, 20]
    assert all(locate(str(c)).layout == "fsdp" for c in t.checkpoints)
    tables = {}
    for kind in ("runs", "export"):
        code = main(["analyze", str(verl / "base"), str(verl / kind / "seed1"), str(verl / kind / "seed3"),
                     "--out", str(tmp_path / kind), "--quiet", "--no-rank", "--no-cache"])
        _, err = capsys.readouterr()
        assert code == 0, err
        with open(tmp_path / kind / "timeline.csv", newline="") as fh:
            tables[kind] = {(r["run"], canonical(r["tensor"]), r["step"]): r for r in csv.DictReader(fh)}
        summary = json.loads((tmp_path / kind / "summary.json").read_text())
        assert [r["label"] for r in summary["runs"]] == ["seed1", "seed3"]
        assert [tl["steps"] for tl in summary["timelines"]] == [[10, 20], [10, 20]]
    assert len(tables["runs"]) == 2 * 2 * 22
    for key, row in tables["runs"].items():
        assert {k: v for k, v in row.items() if k != "tensor"} == \
            {k: v for k, v in tables["export"][key].items() if k != "tensor"}, key


# --- the numbers: shards and their export agree ---------------------------------------------------------------

def analysed(base: Path, runs: list[Path]) -> Analysis:
    a = Analysis(str(base), [str(r) for r in runs], AnalysisOptions(compare_dtype="stored", use_cache=False))
    a.run_all()
    a.close()
    return a


@pytest.mark.parametrize("shards, seeds", [
    ([f"runs/seed1/{LAST}", f"runs/seed2/{LAST}/actor", f"runs/seed3/{LAST}"], [1, 2, 3]),
    (["w1/actor", "mesh2d/actor", f"runs/seed3/{LAST}/actor/model_world_size_2_rank_0.pt"], [1, 2, 3]),
])
def test_analysis_of_the_shards_is_the_analysis_of_their_export(verl, shards, seeds):
    from_shards = analysed(verl / "base", [verl / s for s in shards])
    from_export = analysed(verl / "base", [verl / "export" / f"seed{s}" / LAST for s in seeds])
    a, b = from_shards.result, from_export.result
    assert not a.skipped and not b.skipped
    assert a.complete and b.complete and sorted(a.tensors) == sorted(b.tensors) and len(a.tensors) == 22
    hidden = 0
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        for ra, rb in zip(ta.runs, tb.runs):
            assert (ra.dtype, ra.true_dtype) == (rb.dtype, rb.true_dtype) == ("bf16", "fp32"), name
            assert (ra.updated, ra.true_updated, ra.rank, ra.hidden_by_bf16) == \
                (rb.updated, rb.true_updated, rb.rank, rb.hidden_by_bf16), name
            hidden += ra.true_updated - ra.updated
        assert ta.both == tb.both and ta.agreement == tb.agreement, name
    assert hidden > 0  # updates below half a bf16 ULP: counted as true updates, invisible in bf16
    ranked = [r.rank for t in a.tensors.values() if len(t.shape) == 2 for r in t.runs]
    assert len(ranked) == 3 * 16 and None not in ranked  # every matrix's rank, the same from both
    sa, sb = a.stats(), b.stats()
    for i in range(3):
        for j in range(i + 1, 3):
            assert sa.pair(i, j) == sb.pair(i, j)


# --- what is made of the shards: a transplant, the kinship warnings ------------------------------------------

def widened(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor's values as float32, by numpy from its bits."""
    return (t.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def test_a_transplant_of_the_shards_is_a_hugging_face_checkpoint(verl, tmp_path, capsys):
    """From FSDP1-wrapped shards: one model.safetensors under the base's names, float32 as the shards store it,
    torch's own gathered tensor where the mask is true and the base elsewhere; config.json from actor/huggingface/."""
    run, mask, out = verl / "runs" / "seed3" / "global_step_10", tmp_path / "mask.safetensors", tmp_path / "t"
    for args in (["masks", verl / "base", run, "--out", mask], ["transplant", verl / "base", run, "--mask", mask,
                                                                "--out", out]):
        code = main([str(a) for a in args] + ["--quiet"])
        assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "transplant.json"]
    assert (out / "config.json").read_text() == (run / "actor" / "huggingface" / "config.json").read_text()
    got, base = load_file(str(out / "model.safetensors")), load_file(str(verl / "base" / "model.safetensors"))
    masks, torch_gathered = load_file(str(mask)), gathered(verl, 3, "global_step_10")
    assert sorted(got) == sorted(base) == sorted(masks) and len(got) == 22
    taken = 0
    for name, m in masks.items():
        assert got[name].dtype == torch.float32, name
        want = np.where(m.numpy(), torch_gathered[canonical(name)].numpy(), widened(base[name]))
        assert np.array_equal(got[name].numpy(), want), name
        taken += int(m.sum())
    assert 0 < taken < sum(m.numel() for m in masks.values())
    assert json.loads((out / "transplant.json").read_text())["mask_true"] == taken


def test_a_transplant_of_shards_whose_config_names_bf16_names_the_fp32_it_is_written_in(verl, tmp_path, capsys):
    """verl's huggingface/config.json is the pretrained model's and often names bfloat16, which transformers would
    load the fp32 masters in: the transplant's config names float32, and nothing else of it changes."""
    run = tmp_path / "seed1" / "global_step_20"
    shutil.copytree(verl / "runs" / "seed1" / "global_step_20", run)
    (run / "actor" / "huggingface" / "model.safetensors").unlink()  # verl's bf16 copy: not what is read anyway
    config = json.loads((run / "actor" / "huggingface" / "config.json").read_text())
    (run / "actor" / "huggingface" / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    mask, out = tmp_path / "mask.safetensors", tmp_path / "t"
    for args in (["masks", verl / "base", run, "--out", mask], ["transplant", verl / "base", run, "--mask", mask,
                                                                "--out", out]):
        assert main([str(a) for a in args] + ["--quiet"]) == 0, capsys.readouterr().err
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text()) == {**config, "torch_dtype": "float32"}


def test_a_large_transplant_of_shards_is_written_in_hugging_face_shards(verl, tmp_path, capsys, monkeypatch):
    """Past the largest shard, the transplant is model-0000i-of-0000N.safetensors with an index naming each tensor's
    file, each shard at most that size unless one tensor is larger; together they hold what one file would."""
    from rlsub_tui.compute import transplant

    limit = 40_000
    monkeypatch.setattr(transplant, "SHARD_BYTES", limit)
    run, mask = verl / "runs" / "seed1" / LAST, tmp_path / "mask.safetensors"
    for args in (["masks", verl / "base", run, "--out", mask], ["transplant", verl / "base", run, "--mask", mask,
                                                                "--out", tmp_path / "t"]):
        assert main([str(a) for a in args] + ["--quiet"]) == 0, capsys.readouterr().err
    shards = sorted((tmp_path / "t").glob("model-*.safetensors"))
    assert len(shards) > 2 and [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                          for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "t" / "model.safetensors.index.json").read_text())["weight_map"]
    held = {}
    for shard in shards:
        tensors = load_file(str(shard))
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        assert sum(sizes) <= limit or len(sizes) == 1, shard.name
        held.update({n: (shard.name, t) for n, t in tensors.items()})
    assert index == {n: f for n, (f, _) in held.items()}
    base, torch_gathered, masks = load_file(str(verl / "base" / "model.safetensors")), gathered(verl, 1), load_file(str(mask))
    assert sorted(held) == sorted(base)
    for name, (_, t) in held.items():
        want = np.where(masks[name].numpy(), torch_gathered[canonical(name)].numpy(), widened(base[name]))
        assert np.array_equal(t.numpy(), want), name


def test_a_shard_run_of_another_architecture_is_warned_about(verl, tmp_path):
    """Its actor/huggingface/config.json names another architecture: that run, and only it, is warned about."""
    step = tmp_path / "seed1" / LAST
    shutil.copytree(verl / "runs" / "seed1" / LAST, step)
    config = step / "actor" / "huggingface" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["MistralForCausalLM"]}))
    a = Analysis(str(verl / "base"), [str(verl / "export" / "seed2" / LAST), str(step)],
                 AnalysisOptions(use_cache=False))
    a.close()
    warned = [n for n in a.result.notes if NOT_A_FINE_TUNE in n]
    assert len(warned) == 1 and warned[0].startswith(f"run '{a.result.run_labels[1]}'"), a.result.notes
    assert "another architecture" in warned[0] and "run MistralForCausalLM" in warned[0]


def test_a_shard_run_of_another_base_is_warned_about(verl, tmp_path):
    """Against a base of the same names and shapes but other weights, the median ‖Δ‖/‖W0‖ is numpy's on torch's
    gathered tensors (rounded to bf16, the comparison's dtype) and above the limit; against its own base, below."""
    run, other = verl / "runs" / "seed1" / LAST, tmp_path / "other-base"
    base = load_file(str(verl / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    other.mkdir()
    save_file({n: (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16) for n, t in base.items()},
              str(other / "model.safetensors"))
    shutil.copy(verl / "base" / "config.json", other)
    torch_gathered = gathered(verl, 1)
    for base_dir, warned in ((other, True), (verl / "base", False)):
        w0 = {n: widened(t).astype(np.float64) for n, t in load_file(str(base_dir / "model.safetensors")).items()}
        ratios = [np.sqrt(((round_bf16(torch_gathered[canonical(n)].numpy()) - w) ** 2).sum() / (w ** 2).sum())
                  for n, w in w0.items() if (w ** 2).sum() > 0]
        median = float(np.median(ratios))
        warnings = distance_warnings(analysed(base_dir, [run]).result)
        assert (median > RELATIVE_NORM_LIMIT) == warned and len(warnings) == warned, (median, warnings)
        if warned:
            assert NOT_A_FINE_TUNE in warnings[0]
            assert float(warnings[0].split("‖Δ‖/‖W0‖ is ")[1].split(" ")[0]) == pytest.approx(median, rel=1e-2)


# --- bad input ---------------------------------------------------------------------------------------------------

def copy_actor(verl: Path, tmp_path: Path, source: str = f"runs/seed1/{LAST}/actor") -> Path:
    actor = tmp_path / "bad" / "actor"
    shutil.copytree(verl / source, actor, ignore=shutil.ignore_patterns("huggingface"))
    return actor


def truncated(actor: Path) -> None:
    f = actor / "model_world_size_2_rank_1.pt"
    os.truncate(f, f.stat().st_size // 2)


def swapped(actor: Path) -> None:
    a, b = actor / "model_world_size_2_rank_0.pt", actor / "model_world_size_2_rank_1.pt"
    a.rename(actor / "tmp")
    b.rename(a)
    (actor / "tmp").rename(b)


def mixed_world_sizes(actor: Path) -> None:
    shutil.copy(actor / "model_world_size_2_rank_0.pt", actor / "model_world_size_4_rank_0.pt")


def mesh_of_four(actor: Path) -> None:
    for r in (0, 1):  # ranks 0 and 1 of a W = 4 save renamed as a whole W = 2 save
        shutil.copy(actor.parent / "mesh" / f"model_world_size_4_rank_{r}.pt", actor / f"model_world_size_2_rank_{r}.pt")


def the_others_config(actor: Path) -> None:
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))


@pytest.mark.parametrize("spoil, needles", [
    (truncated, ["model_world_size_2_rank_1.pt", "truncated"]),
    (lambda a: (a / "model_world_size_2_rank_1.pt").unlink(), ["actor", "rank 1 of world size 2 is missing"]),
    (the_others_config, ["fsdp_config.json", "world_size 4", "world size 2"]),
    (mixed_world_sizes, ["actor", "world sizes 2, 4"]),
    (mesh_of_four, ["model_world_size_2_rank_0.pt", "mesh of shape [2, 2] (4 ranks)", "world size 2"]),
    (swapped, ["model_world_size_2_rank_0.pt", "written by rank 1", "named rank 0"]),
])
def test_a_spoilt_save_is_refused_in_one_sentence(verl, tmp_path, capsys, spoil, needles):
    actor = copy_actor(verl, tmp_path)
    shutil.copytree(verl / "mesh2d" / "actor", actor.parent / "mesh")
    spoil(actor)
    assert_refused(tmp_path, verl, actor, capsys, *needles)


@pytest.mark.parametrize("written, needles", [
    ("bad/keys", ["model_world_size_2_rank_1.pt", "lacks tensor 'lm_head.weight'", "model_world_size_2_rank_0.pt"]),
    ("bad/shape", ["model_world_size_2_rank_1.pt", "'model.layers.0.mlp.up_proj.weight'", "[36, 48]",
                   "gives this rank [37, 48]"]),
    ("bad/partial", ["model_world_size_2_rank_0.pt", "'model.layers.0.mlp.up_proj.weight'", "Partial",
                     "cannot be assembled"]),
])
def test_shards_that_cannot_be_assembled_are_refused(verl, tmp_path, capsys, written, needles):
    assert_refused(tmp_path, verl, verl / written, capsys, *needles)


def test_a_pickle_that_would_run_code_is_refused_and_not_run(verl, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    actor = copy_actor(verl, tmp_path)
    state = torch.load(actor / "model_world_size_2_rank_1.pt", weights_only=False)  # our own file, trusted here
    state["model.norm.weight"] = Payload()
    torch.save(state, actor / "model_world_size_2_rank_1.pt")
    assert_refused(tmp_path, verl, actor, capsys, "model_world_size_2_rank_1.pt", "refused", "system",
                   "nothing in it was run")
    assert not marker.exists()


def assert_refused(tmp_path: Path, verl: Path, run: Path, capsys, *needles: str) -> None:
    code = main(["analyze", str(verl / "base"), str(run), "--out", str(tmp_path / "out"), "--quiet", "--no-cache"])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("rlsub-tui: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
