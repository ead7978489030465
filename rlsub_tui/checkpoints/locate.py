"""Finding checkpoints on disk (directories, shard indexes, the local HF cache) and fingerprinting them.

No torch here: the explorer uses it to reopen a cached analysis without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlsub_tui.checkpoints.safetensors_header import header_prefix
from rlsub_tui.util.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def parse_run_spec(spec: str) -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain path -> (None, PATH)."""
    if "=" in spec:
        name, _, path = spec.partition("=")
        if name and path and "/" not in name and not Path(spec).exists():
            return name, path
    return None, spec


def unique_labels(wanted: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in wanted:
        if label in seen:
            seen[label] += 1
            candidate = f"{label}-{seen[label]}"
            while candidate in seen:
                seen[label] += 1
                candidate = f"{label}-{seen[label]}"
            seen[candidate] = 1
            out.append(candidate)
        else:
            seen[label] = 1
            out.append(label)
    return out


# safetensors files (one or sharded), pickled .bin/.pt, or what a trainer writes itself: a PEFT adapter, verl's
# FSDP shards (one torch.save per rank), a torch.distributed.checkpoint folder, DeepSpeed ZeRO partitions
CheckpointLayout = Literal["safetensors", "pickle", "peft", "fsdp", "dcp", "zero"]


@dataclass(frozen=True)
class Located:
    """What a user's checkpoint argument points to: its files and their layout."""

    source: str
    path: Path
    files: list[Path]
    layout: CheckpointLayout


def _header_digest(file: Path) -> str:
    """Hash of a file's first bytes (the header for safetensors); cheap, and changes with content layout."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        h.update(header_prefix(fh) if file.suffix == ".safetensors" else fh.read(8 + (1 << 16)))
    return h.hexdigest()


def config_file(files: list[Path]) -> Path | None:
    """The config.json beside a checkpoint's weights, if there is one (for verl's FSDP rank files, the one in the
    huggingface/ folder beside them)."""
    if not files:
        return None
    folder = files[0].parent
    candidates = [folder / "config.json"] + ([folder / "huggingface" / "config.json"]
                                             if FSDP_SHARD.match(files[0].name) else [])
    if ZERO_MODEL_STATES.match(files[0].name) or files[0].name == ".metadata":
        # a Trainer's checkpoint-N/ holds config.json beside global_stepN/ (ZeRO) or pytorch_model_fsdp_0/ (DCP)
        candidates.append(folder.parent / "config.json")
    return next((c for c in candidates if c.is_file()), None)


def fingerprint(files: list[Path]) -> str:
    """Identity of a checkpoint's bytes for caching: every file's path, size, mtime and header.

    The config.json beside the weights counts too: tied embeddings and fp8 block sizes are read from it.
    """
    h = hashlib.sha256()
    config = config_file(files)
    for file in sorted(files) + ([config] if config else []):
        st = file.stat()
        h.update(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        h.update(_header_digest(file).encode())
    return h.hexdigest()


def _resolve_index(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text())
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot be read ({exc.strerror or exc}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{index}: is not valid JSON.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' of tensor names to shard files.")
    root = index.parent.resolve()
    shards: list[Path] = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: tensor '{tensor}' maps to an invalid shard {shard!r}.")
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{index}: shard '{shard}' (for tensor '{tensor}') lies outside the checkpoint's directory; refused."
            )
        path = (index.parent / shard)
        if path.resolve().parent != root and root not in path.resolve().parents:
            raise CheckpointError(f"{index}: shard '{shard}' resolves outside the checkpoint's directory; refused.")
        if not path.is_file():
            raise CheckpointError(f"{index}: shard '{shard}' (for tensor '{tensor}') does not exist.")
        if path not in shards:
            shards.append(path)
    return shards


def _find_in_hf_cache(model_id: str) -> Path | None:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    folder = "models--" + model_id.replace("/", "--")
    for root in roots:
        repo = root / folder
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = snapshots / ref.read_text().strip()
            if snap.is_dir():
                return snap
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return None


MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def locate(source: str) -> Located:
    """Find what the user named: a model directory, one weights file, or a model id in the local HF cache."""
    path = Path(source).expanduser()
    if not path.exists():
        if MODEL_ID.match(source) and not source.startswith((".", "/")):
            snap = _find_in_hf_cache(source)
            if snap is None:
                raise CheckpointError(
                    f"{source}: no such path, and no model of that id in the local Hugging Face cache "
                    "(we never download; fetch it first with huggingface-cli download)."
                )
            path = snap
        else:
            raise CheckpointError(f"{source}: no such file or directory.")
    if path.is_file():
        if FSDP_SHARD.match(path.name) or ZERO_FILE.match(path.name):  # one rank's file stands for its save
            return trainer_layout(source, path.parent)
        if path.suffix == ".safetensors":
            return Located(source, path, [path], "safetensors")
        if path.suffix in PICKLE_SUFFIXES:
            return Located(source, path, [path], "pickle")
        if path.name.endswith(".index.json"):
            return _from_index(source, path, path)
        raise CheckpointError(f"{source}: is not a .safetensors, .bin or index file.")
    if not path.is_dir():
        raise CheckpointError(f"{source}: is neither a file nor a directory.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{source}: directory cannot be read (permission denied).")
    trainer = trainer_layout(source, path)
    if trainer is not None:
        return trainer
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            return _from_index(source, path, path / index_name)
    if (path / "model.safetensors").is_file():
        return Located(source, path, [path / "model.safetensors"], "safetensors")
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return Located(source, path, singles, "safetensors")
    if (path / "pytorch_model.bin").is_file():
        return Located(source, path, [path / "pytorch_model.bin"], "pickle")
    if len(singles) > 1:
        raise CheckpointError(
            f"{source}: holds {len(singles)} .safetensors files but no model.safetensors.index.json to join them."
        )
    actor = actor_shards(source, path)
    if actor is not None:
        return actor
    step = _dcp_step(source, path)
    if step is not None:
        return step
    inner = checkpoint_subfolders(path)
    if inner:
        shown = ", ".join(p.name for p in inner[:6]) + (f" and {len(inner) - 6} more" if len(inner) > 6 else "")
        stepped = [p for p in inner if STEP.search(p.name)]
        example = stepped[-1] if stepped else inner[0]
        raise CheckpointError(
            f"{source}: holds no checkpoint itself but {len(inner)} checkpoint folder(s) ({shown}): "
            f"name one of them, e.g. {path / example.name}."
        )
    raise CheckpointError(
        f"{source}: holds no checkpoint (no model.safetensors, shard index or pytorch_model.bin)."
    )


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FSDP_SHARD = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
# DeepSpeed's engine.save_checkpoint: mp_rank_00_model_states.pt (ZeRO-3: one zero_pp_rank_R_... per rank) and one
# [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt per data-parallel rank, in a tag folder (global_stepN) that the
# `latest` file beside it names
ZERO_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
ZERO_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO_FILE = re.compile(f"{ZERO_MODEL_STATES.pattern}|{ZERO_OPTIM_STATES.pattern}")


def trainer_layout(source: str, path: Path) -> Located | None:
    """A folder a trainer wrote in its own format: a PEFT adapter (adapter_config.json and its weights), verl's
    FSDP shards (model_world_size_W_rank_R.pt, in order of rank), a torch.distributed.checkpoint folder
    (.metadata and its .distcp files), or DeepSpeed ZeRO partitions (see _zero); None for anything else."""
    if (path / "adapter_config.json").is_file():
        weights = [path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()]
        if not weights:
            raise CheckpointError(f"{source}: has adapter_config.json but no {' or '.join(ADAPTER_WEIGHTS)}.")
        return Located(source, path, [weights[0], path / "adapter_config.json"], "peft")
    shards = sorted((int(m.group(2)), f) for f in path.glob("model_world_size_*_rank_*.pt")
                    if (m := FSDP_SHARD.match(f.name)))
    if shards:
        return Located(source, path, [f for _, f in shards], "fsdp")
    for dcp in (path, path / ACCELERATE_DCP):
        if (dcp / ".metadata").is_file():
            return _dcp(source, path, dcp)
    return _zero(source, path)


def _zero(source: str, path: Path) -> Located | None:
    """A DeepSpeed tag folder (its model and optimizer states, model states first, each by rank), or a folder whose
    `latest` file names one (engine.save_checkpoint's folder, a Trainer's checkpoint-N: its fp32 masters are read,
    not the bf16 model.safetensors beside them); None for anything else."""
    folder = path
    latest = path / "latest"
    if latest.is_file() and not any(ZERO_MODEL_STATES.match(f.name) for f in path.glob("*_model_states.pt")):
        try:
            tag = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not tag or Path(tag).name != tag or tag in (".", "..") or not (path / tag).is_dir():
            return None  # not a tag folder beside it: some other trainer's `latest`
        folder = path / tag
    model = sorted(((int(m.group(1) or 0), f) for f in folder.glob("*_model_states.pt")
                    if (m := ZERO_MODEL_STATES.match(f.name))), key=lambda t: (t[0], t[1].name))
    optim = sorted(((int(m.group(1)), f) for f in folder.glob("*_optim_states.pt")
                    if (m := ZERO_OPTIM_STATES.match(f.name))), key=lambda t: (t[0], t[1].name))
    if not model and not optim:
        return None
    return Located(source, path, [f for _, f in model] + [f for _, f in optim], "zero")


ACCELERATE_DCP = "pytorch_model_fsdp_0"  # accelerate's FSDP model folder inside a (Trainer) checkpoint folder


def _dcp(source: str, path: Path, folder: Path) -> Located:
    return Located(source, path, [folder / ".metadata"] + sorted(folder.glob("*.distcp")), "dcp")


def _dcp_step(source: str, path: Path) -> Located | None:
    """For a folder that holds no checkpoint itself, torchtitan's checkpoint/step-N (or step-N) when it is the only
    step folder there; several steps in the folder itself are a timeline (or listed by locate)."""
    for root in (path, path / "checkpoint"):
        try:
            steps = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := STEP.match(d.name)) and d.is_dir())
        except OSError:
            continue
        if len(steps) == 1 and (steps[0][1] / ".metadata").is_file():
            return _dcp(source, path, steps[0][1])
        steps = [(n, d) for n, d in steps if (d / ".metadata").is_file()]
        if len(steps) > 1 and root != path:
            raise CheckpointError(f"{source}: holds {len(steps)} torch.distributed.checkpoint steps in {root} "
                                  f"({', '.join(d.name for _, d in steps[:6])}): name one of them, e.g. "
                                  f"{steps[-1][1]}, or {root} itself as a run for its timeline.")
    return None


def actor_shards(source: str, path: Path) -> Located | None:
    """verl's step folder (global_step_N): the actor's FSDP rank files in its actor/ folder, preferred to any
    weights in actor/huggingface (a copy, often bf16, saved only with hf_model); None when there are none."""
    actor = path / "actor"
    found = trainer_layout(source, actor) if actor.is_dir() else None
    return Located(source, path, found.files, "fsdp") if found is not None and found.layout == "fsdp" else None


# Training-step folders: a Trainer's checkpoint-N, verl's global_step_N, step_N, ckpt-N, iter_N.
STEP = re.compile(r"^(?:checkpoint|global_step|step|ckpt|iter)[-_]?(\d+)$", re.IGNORECASE)


def checkpoint_subfolders(path: Path) -> list[Path]:
    """Subfolders that hold weights: training-step folders first, by step, then the others by name."""
    try:
        found = [d for d in path.iterdir() if d.is_dir() and _holds_weights(d)]
    except OSError:
        return []

    def order(d: Path):
        m = STEP.search(d.name)
        return (0, int(m.group(1)), d.name) if m else (1, 0, d.name)

    return sorted(found, key=order)


def _holds_weights(d: Path) -> bool:
    try:
        return (any(f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json") or f.name == ".metadata"
                    or FSDP_SHARD.match(f.name) or ZERO_MODEL_STATES.match(f.name) for f in d.iterdir())
                or (d / ACCELERATE_DCP / ".metadata").is_file()
                or (d / "actor").is_dir() and _holds_weights(d / "actor"))
    except OSError:
        return False


def _from_index(source: str, path: Path, index: Path) -> Located:
    shards = _resolve_index(index)
    layout = "safetensors" if all(s.suffix == ".safetensors" for s in shards) else "pickle"
    if layout == "pickle" and not all(s.suffix in PICKLE_SUFFIXES for s in shards):
        raise CheckpointError(f"{index}: mixes safetensors and pickle shards.")
    return Located(source, path, shards, layout)
