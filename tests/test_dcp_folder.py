"""torch.distributed.checkpoint folders, written by the real library (one process, and two gloo processes saving
DTensor shards), against torch's own dcp_to_torch_save: the reader, the analysis on them, and bad folders refused."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from rlsub_tui.checkpoints.checkpoint import open_checkpoint
from rlsub_tui.checkpoints.dcp_folder import DcpFolder
from rlsub_tui.checkpoints.kinship import NOT_A_FINE_TUNE
from rlsub_tui.checkpoints.step_folders import find_timeline
from rlsub_tui.cli.main import main
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.util.errors import CheckpointError

SEEDS = (0, 1, 2)
COLUMN_SHARDED = "model.layers.1.self_attn.q_proj.weight"  # saved as Shard(1): chunks are column blocks


def tiny_llama_base(directory: Path) -> dict[str, torch.Tensor]:
    """A tiny Llama in bf16, saved as Hugging Face writes it (model.safetensors + config.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fp32_run(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights moved on ~25% of the parameters (half from a seed-independent set); of those, half by 0.2 of a
    bf16 ULP (below half a ULP: invisible after a bf16 cast), half by 3 ULPs. Norms are left alone."""
    g, common = torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(7)
    out = {}
    for name, w in base.items():
        w32 = w.float()
        if "norm" in name:
            out[name] = w32
            continue
        pick = torch.where(torch.rand(w.shape, generator=g) < 0.5, torch.rand(w.shape, generator=common) < 0.25,
                           torch.rand(w.shape, generator=g) < 0.25)
        ulp = torch.exp2(torch.floor(torch.log2(w32.abs().clamp_min(1e-30))) - 7)
        factor = torch.where(torch.rand(w.shape, generator=g) < 0.5, 0.2, 3.0)
        sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
        out[name] = w32 + pick * sign * factor * ulp
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_sharded(rank: int, port: int, states_file: str, targets: list[str]) -> None:
    """One of two gloo ranks: every run saved as DTensor shards, with optimizer and scheduler state beside."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = DeviceMesh("cpu", [0, 1])
    for state, target in zip(torch.load(states_file, weights_only=True), targets):
        model = {n: distribute_tensor(t, mesh, [Shard(1 if n == COLUMN_SHARDED else 0)]) for n, t in state.items()}
        some = list(state)[:2]
        optimizer = {"state": {n: {"exp_avg": distribute_tensor(torch.zeros_like(state[n]), mesh, [Shard(0)]),
                                   "step": torch.tensor(10.0)} for n in some},
                     "param_groups": [{"lr": 1e-6, "params": some}]}
        dcp.save({"model": model, "optimizer": optimizer, "lr_scheduler": {"last_epoch": 10}, "step": 10},
                 checkpoint_id=target)
    dist.destroy_process_group()


def export_hf(folder: Path, target: Path, config: Path) -> Path:
    """The independent route: torch's dcp_to_torch_save, then the model's tensors written as fp32 safetensors."""
    target.mkdir(parents=True)
    dcp_to_torch_save(folder, target / "full.pt")
    state = torch.load(target / "full.pt", weights_only=True)["model"]
    (target / "full.pt").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"))
    shutil.copy(config, target / "config.json")
    return target


@pytest.fixture(scope="session")
def dcp_runs(tmp_path_factory):
    """root/base (bf16 HF); per seed: acc-seedS/pytorch_model_fsdp_0 (one process, accelerate's layout),
    titan-seedS/checkpoint/step-10 (two gloo ranks, DTensor shards, optimizer state beside), and the exports of
    both through dcp_to_torch_save (acc-seedS-export, titan-seedS-export)."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("dcp")
    base = tiny_llama_base(root / "base")
    runs = [fp32_run(base, s) for s in SEEDS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        for s, state in zip(SEEDS, runs):
            dcp.save({"model": state}, checkpoint_id=root / f"acc-seed{s}" / "pytorch_model_fsdp_0")
    torch.save(runs, root / "runs.pt")
    targets = [str(root / f"titan-seed{s}" / "checkpoint" / "step-10") for s in SEEDS]
    mp.spawn(_save_sharded, args=(_free_port(), str(root / "runs.pt"), targets), nprocs=2)
    for s in SEEDS:
        export_hf(root / f"acc-seed{s}" / "pytorch_model_fsdp_0", root / f"acc-seed{s}-export", root / "base" / "config.json")
        export_hf(Path(targets[s]), root / f"titan-seed{s}-export", root / "base" / "config.json")
    return root


def analyse(root: Path, runs: list[str]):
    analysis = Analysis(str(root / "base"), [str(root / r) for r in runs],
                        AnalysisOptions(compare_dtype="stored", use_cache=False))
    try:
        return analysis.run_all()
    finally:
        analysis.close()


def figures(result) -> dict:
    """Per tensor, per run: updated, true updates, hidden by bf16, rank; and every pair's overlap."""
    return {name: ([(s.updated, s.true_updated, s.hidden_by_bf16, s.rank) for s in t.runs], dict(t.both))
            for name, t in result.tensors.items()}


def test_locates_accelerate_and_torchtitan_from_the_outer_folder(dcp_runs):
    acc = open_checkpoint(str(dcp_runs / "acc-seed0"))
    assert acc.layout == "dcp" and isinstance(acc.reader, DcpFolder)
    assert acc.files[0] == dcp_runs / "acc-seed0" / "pytorch_model_fsdp_0" / ".metadata"
    assert [f.name for f in acc.files[1:]] == ["__0_0.distcp"]
    for named in ("titan-seed0", "titan-seed0/checkpoint", "titan-seed0/checkpoint/step-10"):
        titan = open_checkpoint(str(dcp_runs / named))
        assert titan.files[0] == dcp_runs / "titan-seed0" / "checkpoint" / "step-10" / ".metadata"
        assert [f.name for f in titan.files[1:]] == ["__0_0.distcp", "__1_0.distcp"]
        assert titan.label == Path(named).name


def test_a_transplant_of_a_dcp_run_is_a_hugging_face_checkpoint(dcp_runs, tmp_path, capsys):
    """From torchtitan's two-rank folder (names under the state dict's 'model.' key, optimizer state beside): one
    model.safetensors under the base's names, float32 as stored, torch's own dcp_to_torch_save tensor where the
    mask is true and the base elsewhere; the training state is not written."""
    run, mask, out = dcp_runs / "titan-seed1", tmp_path / "mask.safetensors", tmp_path / "t"
    for args in (["masks", dcp_runs / "base", run, "--out", mask], ["transplant", dcp_runs / "base", run, "--mask",
                                                                    mask, "--out", out]):
        assert main([str(a) for a in args] + ["--quiet"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    # torchtitan writes no config: the base's, naming float32, so that the transplant loads in the dtype it is in
    assert not (run / "config.json").exists()
    config, base_config = (json.loads(p.read_text()) for p in (out / "config.json", dcp_runs / "base" / "config.json"))
    key = "dtype" if "dtype" in base_config else "torch_dtype"  # as transformers >= 4.56 and earlier name it
    assert base_config[key] == "bfloat16" and config == {**base_config, key: "float32"}
    got, masks = load_file(str(out / "model.safetensors")), load_file(str(mask))
    base, exported = (load_file(str(dcp_runs / d / "model.safetensors")) for d in ("base", "titan-seed1-export"))
    assert sorted(got) == sorted(base) == sorted(masks) == sorted(exported)
    for name, m in masks.items():
        assert got[name].dtype == torch.float32, name
        assert np.array_equal(got[name].numpy(), np.where(m.numpy(), exported[name].numpy(), base[name].float().numpy()))
    assert 0 < sum(int(m.sum()) for m in masks.values()) < sum(m.numel() for m in masks.values())


def test_a_dcp_run_of_another_architecture_is_warned_about(dcp_runs, tmp_path):
    """A Trainer folder around accelerate's pytorch_model_fsdp_0/ whose config.json names another architecture:
    that run, and only it, is warned about; with the base's own config.json beside it, no run is."""
    folder = tmp_path / "checkpoint-10"
    shutil.copytree(dcp_runs / "acc-seed0", folder)
    config = json.loads((dcp_runs / "base" / "config.json").read_text())
    for architectures, warned in ((["MistralForCausalLM"], 1), (config["architectures"], 0)):
        (folder / "config.json").write_text(json.dumps({**config, "architectures": architectures}))
        a = Analysis(str(dcp_runs / "base"), [str(dcp_runs / "acc-seed1-export"), str(folder)],
                     AnalysisOptions(use_cache=False))
        a.close()
        notes = [n for n in a.result.notes if NOT_A_FINE_TUNE in n]
        assert len(notes) == warned, a.result.notes
        assert all(n.startswith(f"run '{a.result.run_labels[1]}'") and "run MistralForCausalLM" in n for n in notes)


def test_several_torchtitan_steps_are_a_timeline_or_named_one_by_one(dcp_runs, tmp_path):
    steps = tmp_path / "job" / "checkpoint"
    for n in (10, 20):
        shutil.copytree(dcp_runs / "titan-seed0" / "checkpoint" / "step-10", steps / f"step-{n}")
    with pytest.raises(CheckpointError, match="name one of them, e.g. .*step-20"):
        open_checkpoint(str(tmp_path / "job"))
    timeline = find_timeline(str(steps))
    assert timeline is not None and timeline.steps == [10, 20]


def test_directory_holds_stored_dtypes_global_shapes_and_only_the_model(dcp_runs):
    base = open_checkpoint(str(dcp_runs / "base"))
    for layout in ("acc", "titan"):
        ck = open_checkpoint(str(dcp_runs / f"{layout}-seed0"))
        assert set(ck.tensors) == {"model." + n for n in base.tensors}  # accelerate's wrapper kept, as stored
        for name, info in base.tensors.items():
            assert ck.tensors["model." + name].dtype == torch.float32
            assert ck.tensors["model." + name].shape == info.shape
    reader = open_checkpoint(str(dcp_runs / "titan-seed0")).reader
    assert {n.split(".")[0] for n in reader.skipped} == {"optimizer", "lr_scheduler", "step"}
    assert all("training state" in why or "not a tensor" in why for why in reader.skipped.values())
    assert len({c.file.name for c in reader.chunks["model.model.embed_tokens.weight"]}) == 2
    assert [c.sizes for c in reader.chunks["model." + COLUMN_SHARDED]] == [(32, 16), (32, 16)]


def test_how_a_run_was_read_says_which_entries_were_left_unread(dcp_runs):
    """torchtitan's folder holds optimizer and scheduler state and a step count beside the model: the run's "read
    as" says how many of the entries torch's own metadata reader lists are not the model's, and names the first
    with why; accelerate's folder holds the model only, and says nothing of the kind."""
    from torch.distributed.checkpoint import BytesStorageMetadata, FileSystemReader

    md = FileSystemReader(str(dcp_runs / "titan-seed0" / "checkpoint" / "step-10")).read_metadata()
    others = [k for k in md.state_dict_metadata if not k.startswith("model.")]
    first = others[0]
    why = "not a tensor" if isinstance(md.state_dict_metadata[first], BytesStorageMetadata) else \
        f"training state ({first.split('.')[0]})"
    titan, acc = analyse(dcp_runs, ["titan-seed0", "acc-seed0"]).run_read_as
    assert len(others) > 1 and acc == "torch.distributed.checkpoint, fp32"
    assert titan.startswith(f"{acc}, {len(others)} entries not read, first '{first}': {why}"), titan


def test_reads_equal_dcp_to_torch_save_exactly(dcp_runs, tmp_path):
    """numpy, bit for bit, on a row-sharded tensor split unevenly (67 rows), a column-sharded one and a 1-D one."""
    folder = dcp_runs / "titan-seed1" / "checkpoint" / "step-10"
    dcp_to_torch_save(folder, tmp_path / "full.pt")
    truth = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    ck = open_checkpoint(str(dcp_runs / "titan-seed1"))
    for name in ("model.embed_tokens.weight", COLUMN_SHARDED, "model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
        got, want = ck.read("model." + name).numpy(), truth[name].numpy()
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
        rows = min(35, len(want) - 1)  # 35: past the first rank's 34 rows of the embedding
        assert np.array_equal(ck.read("model." + name, rows=rows).numpy().view(np.uint32), want[:rows].view(np.uint32))
        nbytes = ck.read_shape("model." + name, rows=rows)[1]
        buf = torch.empty(nbytes - 3, dtype=torch.uint8)
        ck.read_bytes("model." + name, buf, 3)
        assert np.array_equal(buf.numpy(), want[:rows].reshape(-1).view(np.uint8)[3:nbytes])


@pytest.mark.parametrize("layout", ["acc", "titan"])
def test_analysis_on_dcp_equals_analysis_on_the_exports(dcp_runs, layout):
    runs = [f"{layout}-seed{s}" for s in SEEDS]
    on_dcp = analyse(dcp_runs, runs)
    on_export = analyse(dcp_runs, [r + "-export" for r in runs])
    base = open_checkpoint(str(dcp_runs / "base"))
    assert set(on_dcp.tensors) == set(base.tensors) and not on_dcp.skipped  # every model.model.* name matched
    assert figures(on_dcp) == figures(on_export)
    hidden = sum(s.hidden_by_bf16 for t in on_dcp.tensors.values() for s in t.runs)
    assert hidden > 0 and all(s.true_updated > s.updated_bf16_visible
                              for s in on_dcp.tensors["model.layers.0.mlp.up_proj.weight"].runs)
    assert {p: n for p, n in on_dcp.tensors["model.embed_tokens.weight"].both.items()}  # pair overlaps present


def test_one_process_and_two_rank_saves_give_the_same_figures(dcp_runs):
    assert figures(analyse(dcp_runs, [f"acc-seed{s}" for s in SEEDS])) == \
        figures(analyse(dcp_runs, [f"titan-seed{s}" for s in SEEDS]))


# --- bad folders: one sentence naming the file, exit 2, nothing run ---------------------------------------------

def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *needles: str) -> str:
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("rlsub-tui: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def sharded_copy(dcp_runs: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run" / "checkpoint" / "step-10"
    shutil.copytree(dcp_runs / "titan-seed0" / "checkpoint" / "step-10", folder)
    return folder


def test_truncated_distcp_is_refused(dcp_runs, tmp_path, capsys):
    folder = sharded_copy(dcp_runs, tmp_path)
    shard = folder / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    code, err = run_cli(["analyze", dcp_runs / "base", tmp_path / "run", "--out", tmp_path / "out"], capsys)
    assert_refused(code, err, str(shard), "truncated", "tensor 'model.")
    assert not (tmp_path / "out").exists()


def test_missing_distcp_is_refused(dcp_runs, tmp_path, capsys):
    folder = sharded_copy(dcp_runs, tmp_path)
    (folder / "__1_0.distcp").unlink()
    code, err = run_cli(["analyze", dcp_runs / "base", tmp_path / "run", "--out", tmp_path / "out"], capsys)
    assert_refused(code, err, str(folder / "__1_0.distcp"), "missing", "tensor 'model.")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(f"/tmp/rlsub-tui-dcp-pwned-{os.getpid()}")


def test_metadata_that_would_run_code_is_refused_and_not_run(dcp_runs, tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    folder = sharded_copy(dcp_runs, tmp_path)
    (folder / ".metadata").write_bytes(pickle.dumps(Exploit()))
    code, err = run_cli(["analyze", dcp_runs / "base", tmp_path / "run", "--out", tmp_path / "out"], capsys)
    assert_refused(code, err, str(folder / ".metadata"), "refused", f"{os.system.__module__}.system")
    assert not MARKER.exists()


def chunk_holding(folder: Path, name: str, obj) -> None:
    """Append torch.save(obj) to the folder's first shard and point the first chunk of tensor `name` at it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    shard = folder / "__0_0.distcp"
    start = shard.stat().st_size
    with open(shard, "ab") as fh:
        fh.write(buf.getvalue())

    def change(md):
        key = next(k for k in md.storage_data if k.fqn == name and k.index == 0)
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], offset=start, length=len(buf.getvalue()))
    rewrite_metadata(folder, change)


def test_a_chunk_blob_that_would_run_code_is_refused(dcp_runs, tmp_path):
    """A .distcp chunk is a torch.save blob: one that pickles a callable is refused by weights_only, not run."""
    folder = sharded_copy(dcp_runs, tmp_path)
    name = "model.model.norm.weight"
    chunk_holding(folder, name, Exploit())
    MARKER.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=rf"__0_0\.distcp: refused to load tensor '{name}'"):
        open_folder(folder).read(name)
    assert not MARKER.exists()


def megatron_folder(root: Path, markers: bool) -> Path:
    state = {"decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(12, 4),
             "decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(8, 4),
             "embedding.word_embeddings.weight": torch.zeros(10, 4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=root)
    if markers:
        torch.save({"args": None}, root / "common.pt")
        (root / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return root


@pytest.mark.parametrize("markers", [True, False], ids=["common.pt-and-metadata.json", "mcore-names-only"])
def test_megatron_torch_dist_is_refused_with_the_converter_named(dcp_runs, tmp_path, capsys, markers):
    folder = megatron_folder(tmp_path / "iter_0000010", markers)
    code, err = run_cli(["analyze", dcp_runs / "base", folder, "--out", tmp_path / "out"], capsys)
    line = assert_refused(code, err, str(folder), "Megatron-Core", "verl.model_merger")
    assert ("torch_dist" in line) if markers else ("linear_qkv" in line or "linear_fc1" in line)


def test_optimizer_only_folder_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optimizer": {"state": {"w": {"exp_avg": torch.zeros(3)}}}}, checkpoint_id=tmp_path / "optimizer_0")
    with pytest.raises(CheckpointError, match="holds no model weights, only 1 other entries"):
        open_checkpoint(str(tmp_path / "optimizer_0"))


def rewrite_metadata(folder: Path, change) -> None:
    """Edit a (trusted, test-written) .metadata: change(md) mutates it."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    change(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def open_folder(folder: Path) -> DcpFolder:
    return DcpFolder([folder / ".metadata"] + sorted(folder.glob("*.distcp")))


@pytest.mark.parametrize("case,needle", [("drop", "leave part uncovered"), ("repeat", "overlap")])
def test_chunks_that_do_not_tile_the_shape_are_refused(dcp_runs, tmp_path, case, needle):
    folder = sharded_copy(dcp_runs, tmp_path)
    name = "model.model.layers.0.mlp.gate_proj.weight"

    def change(md):
        chunks = md.state_dict_metadata[name].chunks
        if case == "drop":
            chunks.pop()
        else:
            chunks.append(chunks[0])
    rewrite_metadata(folder, change)
    with pytest.raises(CheckpointError, match=f"{folder / '.metadata'}: tensor '{name}': its chunks {needle}"):
        open_folder(folder)


@pytest.mark.parametrize("case", ["dtype", "shape"])
def test_data_that_disagrees_with_the_metadata_is_refused(dcp_runs, tmp_path, case):
    folder = sharded_copy(dcp_runs, tmp_path)
    name = "model.model.norm.weight"  # 32 values, 16 per rank

    def change(md):
        entry = md.state_dict_metadata[name]
        if case == "dtype":
            entry.properties = dataclasses.replace(entry.properties, dtype=torch.bfloat16)
        else:  # 31 values: the second rank's chunk claims 15 rows where its blob holds 16
            entry.size = torch.Size([31])
            entry.chunks[1] = dataclasses.replace(entry.chunks[1], sizes=torch.Size([15]))
    rewrite_metadata(folder, change)
    ck = open_folder(folder)
    said = "torch.bfloat16 [16]" if case == "dtype" else "torch.float32 [15]"
    with pytest.raises(CheckpointError, match=rf"\.distcp: tensor '{name}' has a chunk at offsets .* holds "
                                              rf"torch\.float32 \[16\], but \.metadata says {re.escape(said)}"):
        ck.read(name)


class Admitted:
    """A class this process has told torch to allow (as another reader's allow-list or a user's code may)."""

    def __init__(self):
        self.x = 1


def test_a_chunk_blob_holds_plain_tensors_only_whatever_torch_allows_meanwhile(dcp_runs, tmp_path):
    """A chunk is loaded under an empty allow-list of its own: a class admitted to torch's safe globals elsewhere in
    the process is still refused there."""
    folder = sharded_copy(dcp_runs, tmp_path)
    name = "model.model.norm.weight"
    chunk_holding(folder, name, Admitted())
    saved = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([Admitted])
    try:
        with pytest.raises(CheckpointError, match=rf"__0_0\.distcp: refused to load tensor '{name}'"):
            open_folder(folder).read(name)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)
