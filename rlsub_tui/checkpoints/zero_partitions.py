"""DeepSpeed ZeRO 1/2/3 checkpoints read as the fp32 master weights in the optimizer files, one parameter at a time,
without DeepSpeed or zero_to_fp32.py (whose layout rules this follows).

The model states file names the parameters (param_shapes, in the flat groups' order) and holds the buffers and frozen
parameters; each data-parallel rank's optimizer file holds its partition of every flat fp32 group. Both are
unpickled under our own allow-list: DeepSpeed's loss scaler, fragment addresses and stage enum become inert records,
and anything else is refused before it runs.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsub_tui.checkpoints.locate import ZERO_MODEL_STATES, ZERO_OPTIM_STATES
from rlsub_tui.checkpoints.mapped_pages import MappedPages
from rlsub_tui.checkpoints.readers import Reader, TensorInfo
from rlsub_tui.checkpoints.restricted_pickle import load_restricted
from rlsub_tui.util.errors import CheckpointError


class _Record:
    """A LossScaler, fragment_address or other DeepSpeed record: unpickled as its attributes, nothing else."""


class _ZeroStage(int):
    """ZeroStageEnum (an int Enum, pickled as a call with its value): the stage as an int."""


_PICKLED_AS = {
    "deepspeed.runtime.fp16.loss_scaler": {"LossScaler": _Record, "DynamicLossScaler": _Record},
    "deepspeed.utils.tensor_fragment": {"fragment_address": _Record},
    "deepspeed.runtime.zero.config": {"ZeroStageEnum": _ZeroStage},
}
ALLOWED = [(stub, f"{module}.{name}") for module, names in _PICKLED_AS.items() for name, stub in names.items()]


def load_states(file: Path) -> dict:
    """One model or optimizer states file, memory-mapped, under ALLOWED; a top-level dict."""
    state = load_restricted(file, ALLOWED, "neither a tensor nor one of DeepSpeed's checkpoint records",
                            "a DeepSpeed checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not DeepSpeed's dict of states.")
    return state


@dataclass(frozen=True)
class _Slice:
    """Elements [start, start + length) of one rank's flat fp32 group: the next part of a parameter."""

    rank: int
    group: int
    start: int
    length: int


@dataclass(frozen=True)
class ModelStates:
    """What the model states file says: parameter names and shapes by group, buffers, frozen and shared params."""

    file: Path
    param_shapes: list[dict[str, tuple[int, ...]]]
    buffers: dict[str, torch.Tensor]
    frozen_shapes: dict[str, tuple[int, ...]]
    frozen_fragments: dict[str, torch.Tensor]
    shared: dict[str, str]  # an alias name -> the name that holds its data
    unlisted: dict[str, torch.Tensor]  # module entries named nowhere else (see ZeroPartitions._add_unlisted)


def model_states(file: Path) -> ModelStates:
    state = load_states(file)
    module, shapes = state.get("module"), state.get("param_shapes")
    if not isinstance(module, dict) or not isinstance(shapes, list) or "buffer_names" not in state:
        raise CheckpointError(f"{file}: is not a DeepSpeed model states file (no module, param_shapes or "
                              "buffer_names).")
    try:
        groups = [{str(n): _shape(s) for n, s in group.items()} for group in shapes]
        frozen = {str(n): _shape(s) for n, s in (state.get("frozen_param_shapes") or {}).items()}
        buffers = {n: module[n] for n in state.get("buffer_names") or () if n in module}
        fragments = dict(state.get("frozen_param_fragments") or {})
        shared = {str(k): str(v) for k, v in (state.get("shared_params") or {}).items()}
        named = {n for group in groups for n in group} | set(frozen) | set(buffers) | set(shared)
        # a module's non-tensor entries (a layer's _extra_state) are no weights
        unlisted = {n: t for n, t in module.items() if n not in named and isinstance(t, torch.Tensor)}
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"{file}: has malformed param_shapes, frozen_param_shapes, buffers or "
                              "shared_params.") from None
    for name, t in {**buffers, **fragments}.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{file}: entry '{name}' is a {type(t).__name__}, not a tensor.")
    return ModelStates(file, groups, buffers, frozen, fragments, shared, unlisted)


def _shape(shape) -> tuple[int, ...]:
    out = tuple(int(d) for d in shape)
    if any(d < 0 for d in out):
        raise ValueError(shape)
    return out


@dataclass(frozen=True)
class OptimStates:
    """One rank's optimizer file: the stage, the partition count and its flat fp32 groups (masters only)."""

    file: Path
    stage: int
    partition_count: int
    groups: list[torch.Tensor]
    alignment_paddings: list[list[int]] | None
    pages: MappedPages


def optim_states(file: Path) -> OptimStates:
    osd = load_states(file).get("optimizer_state_dict")
    if not isinstance(osd, dict):
        raise CheckpointError(f"{file}: is not a DeepSpeed optimizer states file (no optimizer_state_dict).")
    key = "fp32_flat_groups" if "fp32_flat_groups" in osd else "single_partition_of_fp32_groups"
    # DeepSpeed's BF16_Optimizer (bf16 ZeRO-1 with fp32 gradient accumulation) records no stage; its groups are laid
    # out as ZeRO-1's
    stage = osd.get("zero_stage", 1 if key in osd else None)
    count = osd.get("partition_count")
    groups = osd.get(key)
    if stage not in (1, 2, 3) or not isinstance(groups, list):
        raise CheckpointError(f"{file}: is not a ZeRO checkpoint (no zero_stage of 1-3 with its flat fp32 groups).")
    if (key == "fp32_flat_groups") != (stage == 3):
        raise CheckpointError(f"{file}: says ZeRO stage {int(stage)} but holds {key}.")
    counts = count if isinstance(count, (list, tuple)) else [count]
    if not counts or not all(isinstance(c, int) and c > 0 for c in counts):
        raise CheckpointError(f"{file}: has no valid partition_count ({count!r}).")
    for g in groups:
        if not isinstance(g, torch.Tensor) or g.ndim != 1 or not g.is_floating_point():
            raise CheckpointError(f"{file}: its {key} hold a {_describe(g)}, not flat floating-point tensors.")
    paddings = osd.get("param_alignment_paddings")
    if paddings is not None and not (isinstance(paddings, list) and len(paddings) == len(groups)):
        raise CheckpointError(f"{file}: its param_alignment_paddings do not match its {len(groups)} groups.")
    # the masters are saved as Parameters that require grad: copying out of them must not record a graph
    return OptimStates(file, int(stage), max(counts), [g.detach() for g in groups], paddings, MappedPages(file))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    return type(value).__name__


# --- where each parameter's elements lie ----------------------------------------------------------------------


def zero12_slices(sizes: list[int], offset: int, numel: int) -> list[_Slice]:
    """ZeRO-1/2: the group is the ranks' partitions concatenated in rank order (`sizes` each); the parameter is
    elements [offset, offset + numel) of that."""
    out, start = [], 0
    for rank, size in enumerate(sizes):
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if hi > lo:
            out.append(_Slice(rank, -1, lo - start, hi - lo))
        start += size
    return out


def zero3_slices(group_sizes: list[int], offset: int, numel: int, world: int) -> list[_Slice]:
    """ZeRO-3: every rank holds ceil(numel / W) elements of the parameter at the same running `offset` into its
    groups (read as one vector); rank after rank they give the parameter, padded at its end."""
    part = -(-numel // world)
    out = []
    for rank in range(world):
        start = 0
        for group, size in enumerate(group_sizes):
            lo, hi = max(offset, start), min(offset + part, start + size)
            if hi > lo:
                out.append(_Slice(rank, group, lo - start, hi - lo))
            start += size
    return out


class ZeroPartitions(Reader):
    """A DeepSpeed ZeRO tag folder (global_stepN): the directory lists the parameters under their module names with
    their global shapes, float32 (the masters), and the buffers and frozen parameters as the model states hold
    them; `read` puts one parameter together from every rank's memory-mapped partition."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        model_files = [f for f in files if ZERO_MODEL_STATES.match(f.name)]
        optim_files = [f for f in files if ZERO_OPTIM_STATES.match(f.name)]
        self.folder = files[0].parent
        _refuse_model_parallel(self.folder, files)
        if not model_files:
            raise CheckpointError(f"{self.folder}: holds DeepSpeed optimizer states but no mp_rank_00_model_states.pt "
                                  "(or zero_pp_rank_0_mp_rank_00_model_states.pt) naming its parameters.")
        if not optim_files:
            raise CheckpointError(f"{self.folder}: holds DeepSpeed model states but no *_optim_states.pt, where ZeRO "
                                  "keeps the fp32 master weights.")
        self.model = model_states(model_files[0])
        self._optim = self._load_optim(optim_files)
        self.stage = self._optim[0].stage
        self.world_size = len(self._optim)
        self._slices: dict[str, list[_Slice]] = {}
        self._plain: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in self.model.buffers.items():
            self._add_plain(name, t)
        self._add_frozen(model_files)
        if self.stage == 3:
            self._plan_zero3()
        else:
            self._plan_zero12()
            self._add_unlisted()
        for alias, source in self.model.shared.items():
            if source in self.tensors and alias not in self.tensors:
                self._alias(alias, source)
        self._bytes_lock = threading.Lock()
        self._bytes: tuple[str, torch.Tensor] | None = None

    # --- the directory ---

    def _load_optim(self, files: list[Path]) -> list[OptimStates]:
        ranks = sorted((int(ZERO_OPTIM_STATES.match(f.name).group(1)), f) for f in files)
        if len({r for r, _ in ranks}) != len(ranks):
            raise CheckpointError(f"{self.folder}: holds two optimizer states files of one rank (bf16_ and plain "
                                  "zero_pp_rank_*); keep one save's files only.")
        first = optim_states(ranks[0][1])
        world = first.partition_count
        for r in range(world):
            if r not in {rank for rank, _ in ranks}:
                raise CheckpointError(f"{self.folder}: rank {r}'s optimizer states are missing (no "
                                      f"{ranks[0][1].name.replace('rank_' + str(ranks[0][0]), f'rank_{r}', 1)}); "
                                      f"{first.file.name} says the fp32 masters are split over {world} ranks.")
        if len(ranks) != world:
            raise CheckpointError(f"{first.file}: says partition_count {world}, but {self.folder} holds "
                                  f"{len(ranks)} optimizer states files (ranks {', '.join(str(r) for r, _ in ranks)}).")
        states = [first] + [optim_states(f) for _, f in ranks[1:]]
        for s in states[1:]:
            if (s.stage, s.partition_count, len(s.groups)) != (first.stage, world, len(first.groups)):
                raise CheckpointError(f"{s.file}: is ZeRO stage {s.stage} with partition_count {s.partition_count} and "
                                      f"{len(s.groups)} groups, but {first.file.name} is stage {first.stage} with "
                                      f"{world} and {len(first.groups)}; the files are of different saves.")
        return states

    def _info(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], file: Path) -> TensorInfo:
        stored = name.removeprefix("module.")
        if stored in self.tensors:
            raise CheckpointError(f"{file}: tensor '{stored}' appears twice (as a parameter, buffer or frozen one).")
        info = TensorInfo(stored, dtype, shape, file, len(self.tensors), math.prod(shape) * dtype.itemsize)
        self.tensors[stored] = info
        return info

    def _add_plain(self, name: str, t: torch.Tensor, file: Path | None = None) -> None:
        info = self._info(name, t.dtype, tuple(t.shape), file or self.model.file)
        self._plain[info.name] = t.detach()  # a frozen fragment may be saved as a Parameter

    def _add_frozen(self, model_files: list[Path]) -> None:
        """Frozen parameters: whole in the model states (ZeRO-1/2); under ZeRO-3 each rank's model states file holds
        its ceil(numel / W) fragment, joined rank after rank."""
        if not self.model.frozen_shapes:
            return
        ranks = [self.model] if self.stage < 3 else self._rank_model_states(model_files)
        for name, shape in self.model.frozen_shapes.items():
            parts = []
            for m in ranks:
                if name not in m.frozen_fragments:
                    raise CheckpointError(f"{m.file}: lacks the fragment of frozen parameter '{name}'.")
                parts.append(m.frozen_fragments[name].reshape(-1))
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            if flat.numel() < math.prod(shape):
                raise CheckpointError(f"{ranks[-1].file}: frozen parameter '{name}' holds {flat.numel()} elements, "
                                      f"but its shape {list(shape)} needs {math.prod(shape)}.")
            self._add_plain(name, flat[:math.prod(shape)].view(shape))

    def _add_unlisted(self) -> None:
        """ZeRO-1/2 model states hold the whole module in its training dtype. DeepSpeed's BF16_Optimizer (bf16
        ZeRO-1 with fp32 gradient accumulation) lists no frozen_param_shapes: a frozen parameter is then only there,
        under no other name, and is read as stored (it never changed)."""
        for name, t in self.model.unlisted.items():
            self._add_plain(name, t)

    def _rank_model_states(self, model_files: list[Path]) -> list[ModelStates]:
        by_rank = {int(m.group(1) or 0): f for f in model_files if (m := ZERO_MODEL_STATES.match(f.name))}
        for r in range(self.world_size):
            if r not in by_rank:
                raise CheckpointError(f"{self.folder}: rank {r}'s model states are missing (no "
                                      f"zero_pp_rank_{r}_mp_rank_00_model_states.pt), which hold its fragment of "
                                      "the frozen parameters.")
        return [self.model] + [model_states(by_rank[r]) for r in range(1, self.world_size)]

    def _plan_zero12(self) -> None:
        groups = self.model.param_shapes
        if len(groups) != len(self._optim[0].groups):
            raise CheckpointError(f"{self.model.file}: names parameters of {len(groups)} groups, but "
                                  f"{self._optim[0].file.name} holds {len(self._optim[0].groups)} flat groups.")
        for g, shapes in enumerate(groups):
            sizes = [s.groups[g].numel() for s in self._optim]
            paddings = self._optim[0].alignment_paddings
            if paddings is not None and len(paddings[g]) != len(shapes):
                raise CheckpointError(f"{self._optim[0].file}: has {len(paddings[g])} alignment paddings for group {g}, "
                                      f"which has {len(shapes)} parameters.")
            offset, total = 0, sum(sizes)
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                if offset + numel > total:
                    raise CheckpointError(f"{self._optim[-1].file}: group {g} ends at element {total}, before "
                                          f"parameter '{name}' ({list(shape)}, from element {offset}); the partitions "
                                          "do not hold what the model states name.")
                self._add_sliced(name, shape, [_Slice(s.rank, g, s.start, s.length)
                                               for s in zero12_slices(sizes, offset, numel)])
                offset += numel + (int(paddings[g][i]) if paddings is not None else 0)
            align = 2 * self.world_size  # zero_to_fp32's check: both ends rounded up to 2 W
            if -(-offset // align) != -(-total // align):
                raise CheckpointError(f"{self._optim[-1].file}: group {g}'s parameters take {offset} elements, but the "
                                      f"ranks' partitions hold {total}; the partitions do not match the model states.")

    def _plan_zero3(self) -> None:
        sizes = [g.numel() for g in self._optim[0].groups]
        for s in self._optim[1:]:
            if [g.numel() for g in s.groups] != sizes:
                raise CheckpointError(f"{s.file}: its flat groups hold {[g.numel() for g in s.groups]} elements, but "
                                      f"{self._optim[0].file.name}'s hold {sizes}; ZeRO-3 ranks hold equal partitions.")
        offset, total = 0, sum(sizes)
        for name, shape in ((n, s) for group in self.model.param_shapes for n, s in group.items()):
            numel = math.prod(shape)
            part = -(-numel // self.world_size)
            if offset + part > total:
                raise CheckpointError(f"{self._optim[0].file}: its partition ends at element {total}, before "
                                      f"parameter '{name}' ({list(shape)}, from element {offset}); the partitions do "
                                      "not hold what the model states name.")
            self._add_sliced(name, shape, zero3_slices(sizes, offset, numel, self.world_size))
            offset += part
        if offset != total:
            raise CheckpointError(f"{self._optim[0].file}: its parameters take {offset} elements of each rank's "
                                  f"partition, which holds {total}; the partitions do not match the model states.")

    def _add_sliced(self, name: str, shape: tuple[int, ...], slices: list[_Slice]) -> None:
        info = self._info(name, torch.float32, shape, self._optim[0].file)
        for s in slices:
            if self._optim[s.rank].groups[s.group].dtype != torch.float32:
                raise CheckpointError(f"{self._optim[s.rank].file}: holds its masters as "
                                      f"{self._optim[s.rank].groups[s.group].dtype}, not float32.")
        self._slices[info.name] = slices

    def _alias(self, alias: str, source: str) -> None:
        info = self.tensors[source.removeprefix("module.")]
        name = self._info(alias, info.dtype, info.shape, info.file).name
        if info.name in self._slices:
            self._slices[name] = self._slices[info.name]
        else:
            self._plain[name] = self._plain[info.name]

    # --- reads ---

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        shape, nbytes = self.read_shape(name, rows)
        if name in self._plain:
            t = self._plain[name]
            return (t[:rows] if rows is not None and t.ndim else t).contiguous().clone()
        want = nbytes // 4
        out = torch.empty(want, dtype=torch.float32)
        at = 0
        for s in self._slices[name]:
            if at >= want:
                break
            take = min(s.length, want - at)
            part = self._optim[s.rank].groups[s.group][s.start:s.start + take]
            out[at:at + take].copy_(part)
            self._optim[s.rank].pages.release(part)
            at += take
        return out.view(shape)

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        with self._bytes_lock:  # a tensor's slices are read in turn: assemble it once, keep only the last one
            if self._bytes is None or self._bytes[0] != name:
                self._bytes = None
                self._bytes = (name, self.read(name).reshape(-1).view(torch.uint8))
            out.copy_(self._bytes[1][start:start + out.numel()])

    def storage_key(self, name: str) -> tuple | None:
        """Shared parameters (tied embeddings) are one tensor: the same slices or the same stored tensor."""
        if name in self._slices:
            first = self._slices[name][0] if self._slices[name] else None
            return ("zero", first, self.tensors[name].shape) if first else None
        t = self._plain[name]
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def notes(self, label: str) -> list[str]:
        return [f"{label}: read from DeepSpeed ZeRO-{self.stage}'s fp32 master weights, partitioned over "
                f"{self.world_size} rank(s) in {self.folder}."]

    def close(self) -> None:
        self._bytes = None


def _refuse_model_parallel(folder: Path, files: list[Path]) -> None:
    for f in files:
        m = ZERO_MODEL_STATES.match(f.name) or ZERO_OPTIM_STATES.match(f.name)
        if m and int(m.group(2)) != 0:
            raise CheckpointError(f"{f}: is model-parallel rank {int(m.group(2))}; this reader reads data-parallel "
                                  "ZeRO checkpoints (mp_rank_00) only.")
