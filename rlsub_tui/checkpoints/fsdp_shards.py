"""verl's FSDP checkpoints: one `torch.save` of a sharded state dict per rank (model_world_size_W_rank_R.pt), read
back as the global tensors, one tensor at a time, in their stored precision and without torch.distributed.

Each rank's file holds DTensor shards. They are unpickled under our own allow-list: the DTensor, its spec, device
mesh and placements become the inert records below (torch's own DeviceMesh looks up process groups when it is
unpickled), and anything else in a file is refused before it runs.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from rlsub_tui.checkpoints.locate import FSDP_SHARD
from rlsub_tui.checkpoints.mapped_pages import MappedPages
from rlsub_tui.checkpoints.readers import Reader, TensorInfo
from rlsub_tui.checkpoints.restricted_pickle import load_restricted
from rlsub_tui.util.errors import CheckpointError

# --- what a DTensor pickle may hold, as inert records -----------------------------------------------------------


class _DTensorStub(torch.Tensor):
    """Stands in for torch.distributed.tensor.DTensor while a shard file is unpickled: torch rebuilds a DTensor as
    an empty wrapper tensor of the global shape (_rebuild_wrapper_subclass, which needs a Tensor subclass with
    __torch_dispatch__) and hands it the local shard and spec (__setstate__); no operation on it is allowed."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"a DTensor read from a checkpoint is only a record of its shard ({func} not run)")

    def __setstate__(self, state):
        fields, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
        self.fields = {**(fields or {}), **(slots or {})}


class _Record:
    """A DTensorSpec, DeviceMesh or mesh layout: unpickled as its attributes, nothing else."""


class _Shard(_Record):
    """Shard(dim): the tensor split along `dim` over a mesh dimension, as torch.chunk splits it."""


class _Replicate(_Record):
    """Replicate(): every rank of the mesh dimension holds the whole tensor."""


class _Unsupported(_Record):
    """A placement we cannot assemble (Partial sums, strided shards of FSDP with tensor parallelism)."""

    kind = "a placement"


class _Partial(_Unsupported):
    kind = "Partial (unreduced partial sums)"


class _StridedShard(_Unsupported):
    kind = "_StridedShard (FSDP combined with tensor parallelism)"


class _TensorMeta(NamedTuple):
    shape: tuple
    stride: tuple
    dtype: torch.dtype


class _ShardOrderEntry(NamedTuple):
    tensor_dim: int
    mesh_dims: tuple


_STUBS = {
    "DTensor": _DTensorStub, "DTensorSpec": _Record, "TensorMeta": _TensorMeta, "ShardOrderEntry": _ShardOrderEntry,
    "DeviceMesh": _Record, "_MeshLayout": _Record, "_FlatLayout": _Record,
    "Shard": _Shard, "Replicate": _Replicate, "Partial": _Partial, "_Partial": _Partial, "_StridedShard": _StridedShard,
}
# Where torch pickles them: the public torch.distributed.tensor paths (checked on this torch by
# tests/test_fsdp_shards.py) and the private ones of earlier releases (_api, torch.distributed._tensor; not checked).
_PICKLED_AS = {
    "torch.distributed.tensor": ("DTensor",),
    "torch.distributed.tensor._api": ("DTensor",),
    "torch.distributed.tensor._dtensor_spec": ("DTensorSpec", "TensorMeta", "ShardOrderEntry"),
    "torch.distributed.tensor.placement_types": ("Shard", "Replicate", "Partial", "_StridedShard"),
    "torch.distributed.device_mesh": ("DeviceMesh",),
    "torch.distributed._mesh_layout": ("_MeshLayout", "_FlatLayout"),
    "torch.distributed._tensor.api": ("DTensor",),
    "torch.distributed._tensor._dtensor_spec": ("DTensorSpec", "TensorMeta"),
    "torch.distributed._tensor.placement_types": ("Shard", "Replicate", "_Partial", "Partial", "DTensorSpec",
                                                  "TensorMeta"),
}
ALLOWED = [(_STUBS[name], f"{module}.{name}") for module, names in _PICKLED_AS.items() for name in names]

# --- one rank's shards -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalShard:
    """One rank's piece of one tensor: its local values, placements, mesh and the global shape and dtype."""

    local: torch.Tensor
    placements: tuple
    mesh_shape: tuple[int, ...]
    coordinate: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    saved_rank: int | None = None  # the global rank the mesh says wrote this file


def load_rank(file: Path) -> dict[str, torch.Tensor | LocalShard]:
    """One rank's state dict, memory-mapped: plain tensors as they are, each DTensor as its LocalShard."""
    state = load_restricted(file, ALLOWED, "neither a tensor nor a DTensor shard")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: is not a state dict of named tensors.")
    out: dict[str, torch.Tensor | LocalShard] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{file}: is not a state dict of named tensors (a key is {name!r}).")
        if isinstance(value, _DTensorStub):
            out[name] = _local_shard(file, name, value)
        elif type(value) in (torch.Tensor, torch.nn.Parameter):
            out[name] = value
        else:
            raise CheckpointError(f"{file}: entry '{name}' is a {type(value).__name__}, not a tensor.")
    return out


def _local_shard(file: Path, name: str, stub: _DTensorStub) -> LocalShard:
    fields = getattr(stub, "fields", {})
    local, spec = fields.get("_local_tensor"), fields.get("_spec")
    meta = getattr(spec, "tensor_meta", None)
    mesh = getattr(spec, "mesh", None)
    if type(local) is not torch.Tensor or meta is None or mesh is None:
        raise CheckpointError(f"{file}: DTensor '{name}' lacks its local shard, device mesh or global shape.")
    placements = tuple(getattr(spec, "placements", ()))
    for p in placements:
        if not isinstance(p, (_Shard, _Replicate)):
            kind = p.kind if isinstance(p, _Unsupported) else type(p).__name__
            raise CheckpointError(f"{file}: DTensor '{name}' is placed as {kind}, which cannot be assembled.")
    mesh_shape = _mesh_shape(file, mesh)
    if len(mesh_shape) != len(placements):
        raise CheckpointError(f"{file}: DTensor '{name}' has {len(placements)} placements on a mesh of "
                              f"{len(mesh_shape)} dimensions.")
    _check_shard_order(file, name, spec)
    saved_rank = getattr(mesh, "_rank", None)
    return LocalShard(local, placements, mesh_shape, _coordinate(file, mesh, mesh_shape),
                      tuple(int(d) for d in meta.shape), meta.dtype, saved_rank if isinstance(saved_rank, int) else None)


def _mesh_shape(file: Path, mesh: _Record) -> tuple[int, ...]:
    grid = getattr(mesh, "mesh", None)  # older torch pickles the grid of ranks itself
    if isinstance(grid, torch.Tensor):
        return tuple(grid.shape)
    axes = getattr(getattr(mesh, "_layout", None), "axes", None)  # this torch: one flat layout per mesh dimension
    if isinstance(axes, tuple) and all(hasattr(a, "shape") for a in axes):
        return tuple(_size(a.shape) for a in axes)
    raise CheckpointError(f"{file}: its DeviceMesh has no shape this reader knows.")


def _size(shape) -> int:
    return shape if isinstance(shape, int) else math.prod(_size(s) for s in shape)


def _coordinate(file: Path, mesh: _Record, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    coordinate = getattr(mesh, "_coordinate_on_dim", None)
    if not (isinstance(coordinate, (tuple, list)) and len(coordinate) == len(mesh_shape)
            and all(isinstance(c, int) and 0 <= c < n for c, n in zip(coordinate, mesh_shape))):
        raise CheckpointError(f"{file}: its DeviceMesh does not say where this rank sits in the mesh.")
    return tuple(coordinate)


def _check_shard_order(file: Path, name: str, spec) -> None:
    """Shards of one tensor dimension over several mesh dimensions are split in mesh order; refuse any other."""
    for entry in getattr(spec, "shard_order", None) or ():
        dims = tuple(getattr(entry, "mesh_dims", ()))
        if list(dims) != sorted(dims):
            raise CheckpointError(f"{file}: DTensor '{name}' shards dimension {entry.tensor_dim} over mesh dimensions "
                                  f"{list(dims)} out of mesh order, which this reader cannot assemble.")


# --- where each rank's piece sits ------------------------------------------------------------------------------


def shard_box(shape: tuple[int, ...], placements: tuple, mesh_shape: tuple[int, ...],
              coordinate: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the piece of a global tensor that the rank at `coordinate` holds: Shard(d) over a mesh
    dimension of n ranks splits dimension d as torch.chunk does (ceil(L/n) each, the last ones shorter or empty),
    mesh dimensions in order."""
    offsets, sizes = [0] * len(shape), list(shape)
    for p, n, c in zip(placements, mesh_shape, coordinate):
        if isinstance(p, _Shard):
            d = p.dim % len(shape)
            chunk = -(-sizes[d] // n)
            start = min(c * chunk, sizes[d])
            offsets[d] += start
            sizes[d] = min(start + chunk, sizes[d]) - start
    return tuple(offsets), tuple(sizes)


@dataclass(frozen=True)
class _Piece:
    rank: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class FsdpShards(Reader):
    """verl's per-rank FSDP files (model_world_size_W_rank_R.pt, in rank order): the directory lists the global
    tensors; `read` assembles one from every rank's memory-mapped shard."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.world_size = _world_size(self.files)
        self._ranks = [load_rank(f) for f in self.files]
        self._pages = [MappedPages(f) for f in self.files]
        self._pieces: dict[str, list[_Piece]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        first = self._ranks[0]
        for r, state in enumerate(self._ranks[1:], start=1):
            _same_names(self.files[0], first, self.files[r], state)
        for pos, name in enumerate(first):
            shape, dtype, pieces = self._plan(name)
            self._pieces[name] = pieces
            self.tensors[name] = TensorInfo(name, dtype, shape, self.files[0], pos,
                                            math.prod(shape) * dtype.itemsize)
        self._bytes_lock = threading.Lock()
        self._bytes: tuple[str, torch.Tensor] | None = None

    def _plan(self, name: str) -> tuple[tuple[int, ...], torch.dtype, list[_Piece]]:
        """The global shape and dtype of one tensor and the pieces to assemble it from, checked across ranks."""
        values = [state[name] for state in self._ranks]
        if all(isinstance(v, torch.Tensor) for v in values):  # plain entries are replicated: rank 0's is the tensor
            for r, v in enumerate(values):
                if v.shape != values[0].shape or v.dtype != values[0].dtype:
                    raise CheckpointError(f"{self.files[r]}: tensor '{name}' is {_describe(v)} here but "
                                          f"{_describe(values[0])} in rank 0.")
            return tuple(values[0].shape), values[0].dtype, [_Piece(0, (0,) * values[0].ndim, tuple(values[0].shape))]
        if not all(isinstance(v, LocalShard) for v in values):
            r = next(r for r, v in enumerate(values) if isinstance(v, LocalShard) != isinstance(values[0], LocalShard))
            raise CheckpointError(f"{self.files[r]}: tensor '{name}' is a DTensor shard in some ranks and a plain "
                                  "tensor in others.")
        return self._plan_shards(name, values)

    def _plan_shards(self, name: str, shards: list[LocalShard]) -> tuple[tuple[int, ...], torch.dtype, list[_Piece]]:
        s0 = shards[0]
        if math.prod(s0.mesh_shape) != self.world_size:
            raise CheckpointError(f"{self.files[0]}: tensor '{name}' lies on a device mesh of shape {list(s0.mesh_shape)}"
                                  f" ({math.prod(s0.mesh_shape)} ranks), but the checkpoint has world size "
                                  f"{self.world_size}.")
        pieces, seen = [], {}
        for r, s in enumerate(shards):
            if (s.shape, s.dtype, s.mesh_shape, _kinds(s.placements)) != (s0.shape, s0.dtype, s0.mesh_shape,
                                                                          _kinds(s0.placements)):
                raise CheckpointError(f"{self.files[r]}: tensor '{name}' is {list(s.shape)} {_dtype(s.dtype)} placed "
                                      f"{_kinds(s.placements)} on mesh {list(s.mesh_shape)} here but "
                                      f"{list(s0.shape)} {_dtype(s0.dtype)} placed {_kinds(s0.placements)} on mesh "
                                      f"{list(s0.mesh_shape)} in rank 0.")
            if s.saved_rank is not None and s.saved_rank != r:
                raise CheckpointError(f"{self.files[r]}: was written by rank {s.saved_rank}, as its device mesh "
                                      f"records, but is named rank {r}; the rank files are mixed up.")
            if s.coordinate in seen:
                raise CheckpointError(f"{self.files[r]}: holds the same mesh position {list(s.coordinate)} as "
                                      f"{self.files[seen[s.coordinate]].name}; the rank files are mixed up.")
            seen[s.coordinate] = r
            offsets, sizes = shard_box(s.shape, s.placements, s.mesh_shape, s.coordinate)
            if tuple(s.local.shape) != sizes or s.local.dtype != s.dtype:
                raise CheckpointError(f"{self.files[r]}: the shard of tensor '{name}' is {_describe(s.local)}, but a "
                                      f"{list(s.shape)} {_dtype(s.dtype)} tensor placed {_kinds(s.placements)} on "
                                      f"mesh {list(s.mesh_shape)} gives this rank {list(sizes)}.")
            if all(c == 0 for c, p in zip(s.coordinate, s.placements) if isinstance(p, _Replicate)):
                pieces.append(_Piece(r, offsets, sizes))
        return s0.shape, s0.dtype, pieces

    def _local(self, piece: _Piece, name: str) -> torch.Tensor:
        value = self._ranks[piece.rank][name]
        return value.local if isinstance(value, LocalShard) else value

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        info = self.tensors[name]
        shape, _ = self.read_shape(name, rows)
        out = torch.empty(shape, dtype=info.dtype)
        for piece in self._pieces[name]:
            local = self._local(piece, name)
            if not shape:
                out.copy_(local)
                continue
            lo, hi = piece.offsets[0], min(piece.offsets[0] + piece.sizes[0], shape[0])
            if hi <= lo:
                continue
            target = out[lo:hi]
            for d in range(1, len(shape)):
                target = target.narrow(d, piece.offsets[d], piece.sizes[d])
            target.copy_(local[:hi - lo])
            self._pages[piece.rank].release(local[:hi - lo])
        return out

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        with self._bytes_lock:  # a tensor's slices are read in turn: assemble it once, keep only the last one
            if self._bytes is None or self._bytes[0] != name:
                self._bytes = None
                self._bytes = (name, self.read(name).reshape(-1).view(torch.uint8))
            out.copy_(self._bytes[1][start:start + out.numel()])

    def storage_key(self, name: str) -> tuple | None:
        t = self._local(self._pieces[name][0], name)
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def close(self) -> None:
        self._bytes = None


def _kinds(placements: tuple) -> str:
    return "(" + ", ".join(f"Shard({p.dim})" if isinstance(p, _Shard) else "Replicate()" for p in placements) + ")"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {_dtype(t.dtype)}"


def _same_names(file0: Path, first: dict, file: Path, state: dict) -> None:
    missing = [n for n in first if n not in state]
    extra = [n for n in state if n not in first]
    if missing:
        raise CheckpointError(f"{file}: lacks tensor '{missing[0]}' that {file0.name} holds"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}.")
    if extra:
        raise CheckpointError(f"{file}: holds tensor '{extra[0]}' that {file0.name} lacks"
                              f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}.")


def _world_size(files: list[Path]) -> int:
    """W from the file names (every rank 0..W-1 present once) and, when present, fsdp_config.json beside them."""
    if not files:
        raise CheckpointError("no FSDP rank files given.")
    named = []
    for f in files:
        m = FSDP_SHARD.match(f.name)
        if m is None:
            raise CheckpointError(f"{f}: is not named model_world_size_W_rank_R.pt.")
        named.append((int(m.group(1)), int(m.group(2)), f))
    sizes = sorted({w for w, _, _ in named})
    folder = files[0].parent
    if len(sizes) > 1:
        raise CheckpointError(f"{folder}: holds FSDP rank files of world sizes {', '.join(map(str, sizes))}; "
                              "keep one save's files only.")
    world = sizes[0]
    ranks = [r for _, r, _ in named]
    for r in range(world):
        if r not in ranks:
            raise CheckpointError(f"{folder}: rank {r} of world size {world} is missing "
                                  f"(no model_world_size_{world}_rank_{r}.pt).")
    if len(ranks) != world or ranks != sorted(ranks):
        raise CheckpointError(f"{folder}: its FSDP rank files are not ranks 0-{world - 1} of world size {world} "
                              "in order.")
    config = folder / "fsdp_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            raise CheckpointError(f"{config}: cannot be read as JSON.") from None
        said = data.get("world_size") if isinstance(data, dict) else None
        if said is not None and said != world:
            raise CheckpointError(f"{config}: says world_size {said}, but the rank files beside it are of world size "
                                  f"{world}.")
    return world
