"""The transplant: θ0 + M ⊙ Δ written as a checkpoint shaped like the run, in its dtype, and a random-mask control."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from safetensors import safe_open

from rlsub_tui.checkpoints.checkpoint import Checkpoint, open_checkpoint
from rlsub_tui.checkpoints.locate import config_file, parse_run_spec
from rlsub_tui.checkpoints.names import canonical
from rlsub_tui.checkpoints.writer import DTYPE_CODES, Entry, SafetensorsWriter
from rlsub_tui.compute.kernels import CHUNK_ELEMENTS
from rlsub_tui.compute.maskfile import MASK_FORMAT, open_runs, tensor_digest
from rlsub_tui.records.events import Progress
from rlsub_tui.util.errors import InputError
from rlsub_tui.util.files import atomic_directories

RECORD = "transplant.json"
# Files of the run's directory copied next to the weights: config, tokenizer, generation settings, custom code.
AUX_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.*",
                "merges.txt", "added_tokens.json", "chat_template*", "*.jinja", "preprocessor_config.json",
                "*.tiktoken", "configuration_*.py", "modeling_*.py", "tokenization_*.py")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WHOLE_TENSOR_LAYOUTS = ("safetensors", "pickle")  # each file holds whole tensors: the transplant keeps the files
SHARD_BYTES = 5 * 10**9  # the largest shard of a run gathered from ranks (transformers' default max_shard_size)


class MaskFile:
    """A mask file opened for reading: which mask key holds each base tensor's mask, and what it says of its base."""

    def __init__(self, path: Path, run_label: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"--mask {path}: no such file.")
        if self.path.suffix != ".safetensors":
            raise InputError(f"--mask {path}: is not a .safetensors mask file.")
        self.ckpt = open_checkpoint(str(self.path))
        for key, info in self.ckpt.tensors.items():
            if info.dtype != torch.bool:
                raise InputError(f"{self.path}: tensor '{key}' is not a bool mask ({info.dtype}).")
        with safe_open(str(self.path), "pt") as fh:
            meta = fh.metadata() or {}
        self.ours = meta.get("rlsub_tui") == MASK_FORMAT
        try:
            self.base_tensors = json.loads(meta["base_tensors"]) if self.ours else {}
            self.labels = [r["label"] for r in json.loads(meta["runs"])] if self.ours else []
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{self.path}: its rlsub-tui metadata is damaged (base_tensors or runs).") from None
        self.mode = meta.get("mode", "")
        self.fingerprint = meta.get("base_fingerprint")
        self.run_label = run_label
        self.keys = self._select(run_label)

    def _select(self, label: str | None) -> dict[str, str]:
        """{base tensor name: key in the file} for the mask chosen."""
        if self.mode != "per-run":
            if label is not None:
                raise InputError(f"--mask-run {label}: {self.path} holds one combined mask, not one per run.")
            return {k: k for k in self.ckpt.tensors}
        if label is None:
            if len(self.labels) != 1:
                raise InputError(f"{self.path}: holds one mask per run ({', '.join(self.labels)}); "
                                 "choose one with --mask-run.")
            label = self.labels[0]
        if label not in self.labels:
            raise InputError(f"--mask-run {label}: {self.path} has masks for {', '.join(self.labels)} only.")
        self.run_label = label
        prefix = f"{label}/"
        return {k[len(prefix):]: k for k in self.ckpt.tensors if k.startswith(prefix)}

    def read(self, key: str) -> torch.Tensor:
        return self.ckpt.read(key)


@dataclass(frozen=True)
class Planned:
    """One run tensor to write: its base counterpart and mask key, or neither (copied from the run)."""

    run_name: str
    base_name: str | None
    mask_key: str | None
    recorded_name: str | None


@dataclass
class OutputCounts:
    """One written checkpoint's figures, as transplant.json records them."""

    kind: Literal["transplant", "random-control"]
    path: Path
    mask_true: int = 0
    changed_from_base: int = 0
    tensors: int = 0


@dataclass
class TransplantReport:
    numel: int = 0
    run_differs: int = 0
    outputs: list[OutputCounts] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_transplant(mask: MaskFile, base: Checkpoint, run: Checkpoint) -> list[Planned]:
    """Match the mask's tensors to the base and the run; refuse any mismatch in names or shapes."""
    base_by = {canonical(n): n for n in base.tensors}
    run_by = {canonical(n): n for n in run.tensors}
    chosen: dict[str, Planned] = {}
    for name, key in mask.keys.items():
        bname = base_by.get(canonical(name))
        if bname is None:
            raise InputError(f"{mask.path}: mask '{key}' is for tensor '{name}', which the base {base.source} "
                             "does not have; the mask belongs to another model.")
        binfo, mshape = base.tensors[bname], mask.ckpt.tensors[key].shape
        if mshape != binfo.shape:
            raise InputError(f"{mask.path}: mask '{key}' has shape {list(mshape)} but the base's '{bname}' has "
                             f"shape {list(binfo.shape)}.")
        recorded = mask.base_tensors.get(name)
        if mask.ours and (recorded is None or recorded[:2] != [DTYPE_CODES[binfo.dtype], list(binfo.shape)]):
            raise InputError(f"{mask.path}: was made from a different base than {base.source} "
                             f"(tensor '{bname}' does not match the recorded base fingerprint).")
        rname = run_by.get(canonical(name))
        if rname is None:
            raise InputError(f"{run.source}: has no tensor '{name}', which the mask {mask.path} covers.")
        if run.tensors[rname].shape != binfo.shape:
            raise InputError(f"{run.source}: tensor '{rname}' has shape {list(run.tensors[rname].shape)} but the "
                             f"base and the mask have {list(binfo.shape)}.")
        chosen[rname] = Planned(rname, bname, key, name)
    return [chosen.get(n, Planned(n, None, None, None)) for n in run.tensors]


def random_mask(shape: tuple[int, ...], count: int, seed: int, name: str) -> torch.Tensor:
    """`count` true entries drawn uniformly among all positions; reproducible from (seed, tensor name).

    The count is split over chunks by a multivariate hypergeometric draw (exact), then each chunk's
    positions are drawn without replacement, so memory stays at one chunk of indices.
    """
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(np.random.SeedSequence([seed, salt]))
    sizes = [min(CHUNK_ELEMENTS, n - s) for s in range(0, n, CHUNK_ELEMENTS)]
    per_chunk = rng.multivariate_hypergeometric(sizes, count) if sizes and count else [0] * len(sizes)
    out = np.zeros(n, dtype=bool)
    for start, size, c in zip(range(0, n, CHUNK_ELEMENTS), sizes, per_chunk):
        out[start + rng.choice(size, int(c), replace=False)] = True
    return torch.from_numpy(out).reshape(shape)


def checkpoint_dir(ckpt: Checkpoint) -> Path | None:
    """The directory a checkpoint argument names (or the cached snapshot of a model id); None for one file."""
    source = Path(ckpt.source).expanduser()
    if source.is_dir():
        return source
    return None if source.exists() else ckpt.files[0].parent


def check_out_dir(out: Path, flag: str, protected_dirs: list[Path], protected_files: list[Path],
                  force: bool) -> None:
    """Refuse an --out that is, holds or lies inside an input, or that is not ours to replace."""
    target = out.resolve()
    for d in protected_dirs:
        d = d.resolve()
        if target == d or d in target.parents or target in d.parents:
            raise InputError(f"{flag} {out}: would write into the input checkpoint directory {d}; refused.")
    for f in protected_files:
        if target in f.resolve().parents:
            raise InputError(f"{flag} {out}: holds the input file {f}; refused.")
    if not target.parent.is_dir():
        raise InputError(f"{flag} {out}: the folder {out.parent} does not exist.")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{flag} {out}: exists and is not a directory.")
        if any(out.iterdir()):
            if not force:
                raise InputError(f"{flag} {out}: is not empty; add --force to replace an earlier transplant.")
            if not (out / RECORD).is_file():
                raise InputError(f"{flag} {out}: holds files that rlsub-tui transplant did not write "
                                 f"(no {RECORD}); refused even with --force.")


def _safetensors_name(file: Path) -> str:
    if file.suffix == ".safetensors":
        return file.name
    stem = file.stem
    return ("model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem) + ".safetensors"


def transplant(base_path: str, run_path: str, mask_path: Path, out: Path, mask_run: str | None = None,
               control_seed: int | None = None, control_out: Path | None = None, force: bool = False,
               on_progress: Callable[[Progress], None] | None = None) -> TransplantReport:
    """Write θ0 + M ⊙ Δ (and, with a seed, the random-mask control) as checkpoints shaped like the run."""
    out = Path(out).expanduser().resolve()
    if not out.name:
        raise InputError(f"--out {out}: name a directory to write the transplant into.")
    if control_seed is not None and control_seed < 0:
        raise InputError(f"--random-control {control_seed}: the seed must be a non-negative integer.")
    base, (run,) = open_runs(base_path, [run_path])
    mask = MaskFile(mask_path, mask_run)
    try:
        plan = plan_transplant(mask, base, run)
        targets = [out]
        if control_seed is not None:
            targets.append(Path(control_out).expanduser().resolve() if control_out
                           else out.with_name(f"{out.name}-random{control_seed}"))
        if len({t.resolve() for t in targets}) < len(targets):
            raise InputError(f"--control-out {targets[-1]}: is the same directory as --out.")
        named = Path(parse_run_spec(run_path)[1]).expanduser()  # a timeline folder, if the run is one
        dirs = [d for d in (checkpoint_dir(base), checkpoint_dir(run), named if named.is_dir() else None) if d]
        files = [*base.files, *run.files, mask.path]
        for t, flag in zip(targets, ("--out", "--control-out")):
            check_out_dir(t, flag, dirs, files, force)
        report = TransplantReport(outputs=[OutputCounts("transplant", out)])
        if not mask.ours:
            report.notes.append(f"{mask.path} was not written by rlsub-tui masks: no base fingerprint to check "
                                "it against the base.")
        if control_seed is not None:
            report.outputs.append(OutputCounts("random-control", targets[1]))
        with atomic_directories(targets) as temps:
            _write_weights(temps, base, run, mask, plan, control_seed, report, on_progress)
            for tmp, counts in zip(temps, report.outputs):
                _copy_aux(base, run, tmp)
                _write_record(tmp, counts, report, base, run, mask, control_seed)
        return report
    finally:
        for c in (base, run, mask.ckpt):
            c.close()


@dataclass(frozen=True)
class OutputFile:
    """One safetensors file of the transplant: its name and the run tensors it holds, in order, as written."""

    name: str
    tensors: list[tuple[str, Planned]]  # (the name written, the run tensor)


def output_files(base: Checkpoint, run: Checkpoint, plan: list[Planned]) -> list[OutputFile]:
    """The transplant's files. A run stored as whole tensors per file (safetensors, pickles) keeps its files and
    names. A LoRA adapter run is the base with some tensors replaced: the base's files and names. A run gathered
    from ranks (FSDP shards, torch.distributed.checkpoint, ZeRO partitions) is written as a Hugging Face checkpoint
    under the base's names (its own stored names carry the trainer's wrappers), in shards of at most SHARD_BYTES."""
    if run.layout in WHOLE_TENSOR_LAYOUTS:
        by_file: dict[Path, list[Planned]] = {}
        for p in plan:
            by_file.setdefault(run.tensors[p.run_name].file, []).append(p)
        return [OutputFile(_safetensors_name(f), [(p.run_name, p) for p in sorted(
            by_file.get(f, []), key=lambda p: run.tensors[p.run_name].offset)]) for f in run.files]
    named = _base_names(base, run, plan)
    if run.layout == "peft":
        in_base: dict[Path, list[tuple[str, Planned]]] = {}
        for name, p in named:  # a tensor saved in full that the base lacks goes with the base's first file
            in_base.setdefault(base.tensors[name].file if name in base.tensors else base.files[0], []).append((name, p))
        return [OutputFile(_safetensors_name(f), sorted(in_base.get(f, []), key=lambda t: (
            t[0] not in base.tensors, base.tensors[t[0]].offset if t[0] in base.tensors else 0))) for f in base.files]
    shards, size = [[]], 0
    for name, p in named:
        nbytes = run.tensors[p.run_name].nbytes
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards, size = shards + [[]], 0
        shards[-1].append((name, p))
        size += nbytes
    if len(shards) == 1:
        return [OutputFile("model.safetensors", shards[0])]
    return [OutputFile(f"model-{i:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards, start=1)]


def _base_names(base: Checkpoint, run: Checkpoint, plan: list[Planned]) -> list[tuple[str, Planned]]:
    """Each run tensor under the base's name for it (a tensor the base lacks keeps its own); two on one refused."""
    base_by = {canonical(n): n for n in base.tensors}
    named, seen = [], {}
    for p in plan:
        name = base_by.get(canonical(p.run_name), p.run_name)
        if name in seen:
            raise InputError(f"{run.source}: tensors '{seen[name]}' and '{p.run_name}' are both the base's "
                             f"'{name}'; the transplant cannot name them apart.")
        seen[name] = p.run_name
        named.append((name, p))
    return named


def _write_weights(temps: list[Path], base: Checkpoint, run: Checkpoint, mask: MaskFile, plan: list[Planned],
                   seed: int | None, report: TransplantReport, on_progress) -> None:
    files = output_files(base, run, plan)
    total = sum(run.tensors[p.run_name].nbytes for p in plan)
    done, start, bytes_done = 0, time.perf_counter(), 0
    weight_map = {}
    for file in files:
        entries = [Entry(name, run.tensors[p.run_name].dtype, run.tensors[p.run_name].shape)
                   for name, p in file.tensors]
        writers = [SafetensorsWriter(t / file.name, entries, {"format": "pt"}) for t in temps]
        try:
            for name, p in file.tensors:
                for w, t in zip(writers, _transplanted(p, base, run, mask, seed, report)):
                    w.write(name, t)
                weight_map[name] = file.name
                done += 1
                bytes_done += run.tensors[p.run_name].nbytes
                if on_progress:
                    on_progress(Progress(done, len(plan), bytes_done, total, time.perf_counter() - start, None, False))
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
    laid_out_as = {"peft": base, **dict.fromkeys(WHOLE_TENSOR_LAYOUTS, run)}.get(run.layout)
    if len(files) > 1 or laid_out_as and any((laid_out_as.files[0].parent / n).is_file() for n in INDEX_NAMES):
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        for t in temps:
            (t / INDEX_NAMES[0]).write_text(json.dumps(index, indent=2) + "\n")


def _transplanted(p: Planned, base: Checkpoint, run: Checkpoint, mask: MaskFile, seed: int | None,
                  report: TransplantReport) -> list[torch.Tensor]:
    """This tensor as each output stores it: the transplant, then the control."""
    r = run.read(p.run_name)
    if p.mask_key is None:
        report.copied.append(p.run_name)
        return [r] * len(report.outputs)
    raw = base.read(p.base_name)
    recorded = mask.base_tensors.get(p.recorded_name)
    if recorded is not None and recorded[2] != tensor_digest(raw):
        raise InputError(f"{mask.path}: was made from a different base than {base.source} (tensor "
                         f"'{p.base_name}' differs from the one the masks were computed on).")
    b = raw.to(r.dtype)
    m = mask.read(p.mask_key)
    masks = [m]
    if seed is not None:
        masks.append(random_mask(tuple(m.shape), int(torch.count_nonzero(m)), seed, p.recorded_name))
    differs = r.view(_int_view(r)) != b.view(_int_view(b)) if r.dtype.itemsize in (1, 2, 4, 8) else r != b
    report.numel += m.numel()
    report.run_differs += int(torch.count_nonzero(differs))
    outs = []
    for counts, mk in zip(report.outputs, masks):
        counts.mask_true += int(torch.count_nonzero(mk))
        counts.changed_from_base += int(torch.count_nonzero(mk & differs))
        counts.tensors += 1
        outs.append(torch.where(mk, r, b))
    return outs


def _int_view(t: torch.Tensor) -> torch.dtype:
    """An integer dtype of the same width, to compare stored bits (so -0.0 and 0.0, or NaNs, count as they are stored)."""
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize]


def _copy_aux(base: Checkpoint, run: Checkpoint, target: Path) -> None:
    """The config, tokenizer and code files beside the run (later folders win): the base's first for a LoRA
    adapter, and for a run gathered from ranks that holds no config.json (a DeepSpeed save made outside a Trainer
    folder, a DCP folder), so that the transplant loads as the model it is; the run's own folder; the folder of its
    config.json where that lies elsewhere (verl's actor/huggingface/, the Trainer folder around a ZeRO tag)."""
    borrowed = run.layout == "peft" or (run.layout not in WHOLE_TENSOR_LAYOUTS and config_file(run.files) is None)
    folders = (_aux_folders(base) if borrowed else []) + _aux_folders(run)
    for folder in dict.fromkeys(folders):
        for f in sorted(folder.iterdir()):
            if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in AUX_PATTERNS) and f.name not in INDEX_NAMES:
                shutil.copyfile(f, target / f.name)
    if run.layout not in WHOLE_TENSOR_LAYOUTS and run.layout != "peft":
        _config_says_written_dtype(target / "config.json", run)


HF_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _config_says_written_dtype(config: Path, run: Checkpoint) -> None:
    """The config of a run gathered from ranks, borrowed from the base or kept beside the save (verl's
    huggingface/config.json is the pretrained model's), often names bfloat16, and transformers loads the weights
    in it: it is made to name the dtype that holds most of the transplant's parameters (the fp32 masters)."""
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # no config, or one that is not JSON: copied as it was
    held: dict[torch.dtype, int] = {}
    for info in run.tensors.values():
        held[info.dtype] = held.get(info.dtype, 0) + int(np.prod(info.shape, dtype=np.int64))
    written = HF_DTYPES.get(max(held, key=held.get)) if held else None
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(raw, dict) and k in raw]
    if written is None or not keys or all(raw[k] == written for k in keys):
        return
    config.write_text(json.dumps({**raw, **dict.fromkeys(keys, written)}, indent=2) + "\n")


def _aux_folders(ckpt: Checkpoint) -> list[Path]:
    folder = checkpoint_dir(ckpt)
    if folder is None:  # one file named: nothing beside it is copied
        return []
    config = config_file(ckpt.files)
    return [folder] + ([config.parent] if config is not None and config.parent != folder else [])


def _write_record(target: Path, counts: OutputCounts, report: TransplantReport, base: Checkpoint, run: Checkpoint,
                  mask: MaskFile, seed: int | None) -> None:
    record = {
        "kind": counts.kind,
        "base": str(base.source), "run": str(run.source), "mask": str(mask.path), "mask_run": mask.run_label,
        "mask_base_fingerprint": mask.fingerprint,
        "random_control_seed": seed if counts.kind == "random-control" else None,
        "tensors_masked": counts.tensors, "numel_masked": report.numel,
        "mask_true": counts.mask_true, "changed_from_base": counts.changed_from_base,
        "run_differs_from_base": report.run_differs,
        "copied_from_run": report.copied,
    }
    (target / RECORD).write_text(json.dumps(record, indent=2) + "\n")
