"""torch.distributed.checkpoint folders (accelerate FSDP, torchtitan, NeMo-RL): the `.metadata` pickle is the
directory, and each tensor is put together from its chunks, torch.save blobs at byte ranges of the .distcp files.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsub_tui.checkpoints.names import canonical
from rlsub_tui.checkpoints.readers import Reader, TensorInfo
from rlsub_tui.checkpoints.restricted_pickle import only_allowed
from rlsub_tui.util.errors import CheckpointError

_DCP = "torch.distributed.checkpoint.metadata"
_OLD_DCP = "torch.distributed._shard.sharded_tensor.metadata"  # where TensorProperties lived before torch 2.4
# What a .metadata pickle may name: the metadata dataclasses, torch's dtypes, Size and layouts, paths. Anything
# else (os.system, eval, a class of the writer's own) is refused before it is looked up.
METADATA_CLASSES = {
    _DCP: {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
           "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    _OLD_DCP: {"TensorProperties", "MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}

# Top-level state-dict keys that hold training state rather than weights (accelerate, torchtitan, NeMo-RL).
TRAINING_STATE = {"optimizer", "optimizers", "optim", "optim_state", "lr_scheduler", "lr_schedulers", "scheduler",
                  "dataloader", "train_state", "rng", "rng_state", "rng_states", "extra_state"}
# Megatron-Core names (its torch_dist checkpoints are DCP folders with mcore's own names and layouts):
# decoder.layers.N.self_attention.linear_qkv.weight, decoder.layers.N.mlp.linear_fc1.weight ...
MCORE_LINEARS = (".linear_qkv.", ".linear_proj.", ".linear_fc1.", ".linear_fc2.")
ZIP_MAGIC = b"PK\x03\x04"  # a torch.save blob is a zip archive


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that looks up only METADATA_CLASSES and torch dtypes; never the rest."""

    def __init__(self, fh, file: Path):
        super().__init__(fh)
        self.file = file

    def find_class(self, module: str, name: str):
        if name in METADATA_CLASSES.get(module, ()):
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                raise CheckpointError(f"{self.file}: names {module}.{name}, which this torch "
                                      f"({torch.__version__}) does not have; it was written by another version.") from None
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # vars: no lazy submodule import
            return vars(torch)[name]
        raise CheckpointError(f"{self.file}: refused to load: the pickle asks for {module}.{name}, which is not one "
                              "of torch.distributed.checkpoint's metadata classes (it could run code if loaded).")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.file}: refused to load: the pickle refers to outside objects, which a "
                              "torch.distributed.checkpoint .metadata never does.")


def load_metadata(file: Path):
    """The Metadata pickled in a DCP folder's `.metadata`, unpickled with only the metadata classes allowed."""
    try:
        with open(file, "rb") as fh:
            md = _MetadataUnpickler(fh, file).load()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc}).") from None
    except Exception as exc:  # any malformed pickle: UnpicklingError, EOFError, TypeError from a bad REDUCE ...
        raise CheckpointError(f"{file}: is not a torch.distributed.checkpoint metadata pickle ({_short(exc)}).") from None
    metadata_cls = getattr(importlib.import_module(_DCP), "Metadata")
    if not isinstance(md, metadata_cls) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise CheckpointError(f"{file}: holds a {type(md).__name__}, not torch.distributed.checkpoint's Metadata.")
    if not isinstance(getattr(md, "storage_data", None), dict):
        raise CheckpointError(f"{file}: has no storage_data (where each chunk's bytes lie); it cannot be read.")
    return md


@dataclass(frozen=True)
class Chunk:
    """One rank's piece of a tensor: where it sits in the global tensor and where its torch.save blob lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    start: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


class DcpFolder(Reader):
    """A torch.distributed.checkpoint folder: `.metadata` (sizes, dtypes, chunk byte ranges) and its .distcp files.

    Tensors keep their stored names (accelerate's `model.` wrapper included: names.canonical matches them to
    the base's) and dtypes. Training state (optimizer, scheduler ...) and pickled non-tensor entries are not
    read; `skipped` says which and why.
    """

    def __init__(self, files: list[Path]):
        self.metadata_file = files[0]
        self.folder = self.metadata_file.parent
        _refuse_megatron_folder(self.folder)
        md = load_metadata(self.metadata_file)
        self._files = {f.name: f for f in files[1:]}
        self._sizes: dict[Path, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.chunks: dict[str, list[Chunk]] = {}
        self.skipped: dict[str, str] = {}
        storage = self._storage_index(md)
        for fqn, entry in md.state_dict_metadata.items():
            reason = _not_weights(fqn, entry, md)
            if reason:
                self.skipped[str(fqn)] = reason
                continue
            self._add(fqn, entry, storage)
        _refuse_megatron_names(self.folder, self.tensors)
        if not self.tensors and self.skipped:
            raise CheckpointError(f"{self.folder}: holds no model weights, only {len(self.skipped)} other entries "
                                  f"(first: {next(iter(self.skipped))}, {next(iter(self.skipped.values()))}).")
        self._held: tuple[str, torch.Tensor] | None = None  # the tensor read_bytes is copying out

    def _storage_index(self, md) -> dict[tuple[str, tuple[int, ...]], object]:
        index = {}
        for key, info in md.storage_data.items():
            fqn, offset = getattr(key, "fqn", None), getattr(key, "offset", None)
            if isinstance(fqn, str) and offset is not None:
                index[(fqn, _ints(offset))] = info
        return index

    def _add(self, fqn: str, entry, storage: dict) -> None:
        """One tensor entry into the directory, its chunks checked against the metadata and the files' sizes."""
        where = f"{self.metadata_file}: tensor '{fqn}'"
        try:
            dtype, shape = entry.properties.dtype, _ints(entry.size)
            placed = [(_ints(c.offsets), _ints(c.sizes)) for c in entry.chunks]
        except (AttributeError, TypeError, ValueError):
            raise CheckpointError(f"{where} has malformed metadata (dtype, size or chunks).") from None
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{where} has no torch dtype ({dtype!r}).")
        chunks = []
        for offsets, sizes in placed:
            if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
                raise CheckpointError(f"{where}: its chunk at offsets {list(offsets)} (sizes {list(sizes)}) lies "
                                      f"outside its shape {list(shape)}.")
            if math.prod(sizes) == 0:
                continue  # an empty chunk (a rank with no rows) holds nothing to read
            chunks.append(self._chunk(fqn, offsets, sizes, storage.get((fqn, offsets))))
        gap = _coverage(shape, chunks)
        if gap:
            raise CheckpointError(f"{where}: its chunks {gap} of its shape {list(shape)}; the checkpoint is incomplete.")
        first = min(chunks, key=lambda c: (c.file.name, c.start)) if chunks else None
        self.tensors[fqn] = TensorInfo(fqn, dtype, shape, first.file if first else self.metadata_file,
                                       first.start if first else 0, math.prod(shape) * dtype.itemsize)
        self.chunks[fqn] = chunks

    def _chunk(self, fqn: str, offsets, sizes, info) -> Chunk:
        if info is None:
            raise CheckpointError(f"{self.metadata_file}: tensor '{fqn}' has a chunk at offsets {list(offsets)} "
                                  "with no storage entry (no file or byte range).")
        rel, start, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not isinstance(rel, str) or not isinstance(start, int) or not isinstance(length, int) or start < 0 or length <= 0:
            raise CheckpointError(f"{self.metadata_file}: tensor '{fqn}' has a malformed storage entry {info!r}.")
        if Path(rel).name != rel or rel in ("", ".", ".."):
            raise CheckpointError(f"{self.metadata_file}: tensor '{fqn}' is stored in '{rel}', outside the "
                                  "checkpoint's folder; refused.")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{self.folder / rel}: tensor '{fqn}' was written through stream extensions "
                                  f"({', '.join(map(str, info.transform_descriptors))}), which this reader does not decode.")
        file = self._files.get(rel, self.folder / rel)
        size = self._file_size(file, fqn)
        if start + length > size:
            raise CheckpointError(f"{file}: is truncated: tensor '{fqn}' has a chunk at bytes {start}-{start + length} "
                                  f"but the file ends at byte {size}.")
        return Chunk(offsets, sizes, file, start, length)

    def _file_size(self, file: Path, fqn: str) -> int:
        if file not in self._sizes:
            try:
                self._sizes[file] = file.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"{file}: is missing; the checkpoint's .metadata puts tensor '{fqn}' "
                                      "in it.") from None
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc}).") from None
        return self._sizes[file]

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        info = self.tensors[name]
        shape, _ = self.read_shape(name, rows)
        chunks = [c for c in self.chunks[name] if not shape or c.offsets[0] < shape[0]]
        if rows is None and len(chunks) == 1 and chunks[0].sizes == info.shape:
            return self._load(name, chunks[0])  # one chunk is the whole tensor: no second copy
        out = torch.empty(shape, dtype=info.dtype)
        for chunk in chunks:
            piece = self._load(name, chunk)
            if shape:
                take = min(chunk.sizes[0], shape[0] - chunk.offsets[0])
                piece = piece[:take]
                where = (slice(chunk.offsets[0], chunk.offsets[0] + take),) + tuple(
                    slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:]))
            else:
                where = ()
            out[where] = piece
            del piece
        return out

    def _load(self, name: str, chunk: Chunk) -> torch.Tensor:
        """One chunk's torch.save blob, read from exactly its byte range and loaded with weights_only=True."""
        raw = self._read_range(name, chunk)
        if raw[:4] != ZIP_MAGIC:
            raise CheckpointError(f"{chunk.file}: tensor '{name}' at byte {chunk.start} is not a torch.save blob "
                                  "(written with another serialization, such as DCP's safetensors format).")
        try:
            with only_allowed([]):  # plain tensors only, whatever another reader's load allows meanwhile
                piece = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{chunk.file}: refused to load tensor '{name}': its blob holds more than a plain "
                                  f"tensor and would run code if unpickled ({_short(exc)}).") from None
        except (RuntimeError, EOFError, ValueError, OSError, struct.error) as exc:
            raise CheckpointError(f"{chunk.file}: tensor '{name}' at byte {chunk.start} cannot be loaded "
                                  f"({_short(exc)}).") from None
        del raw
        info = self.tensors[name]
        if not isinstance(piece, torch.Tensor) or piece.dtype != info.dtype or tuple(piece.shape) != chunk.sizes:
            got = f"{piece.dtype} {list(piece.shape)}" if isinstance(piece, torch.Tensor) else type(piece).__name__
            raise CheckpointError(f"{chunk.file}: tensor '{name}' has a chunk at offsets {list(chunk.offsets)} that "
                                  f"holds {got}, but .metadata says {info.dtype} {list(chunk.sizes)}.")
        if piece.untyped_storage().nbytes() != piece.numel() * piece.element_size():
            piece = piece.clone()  # a view of a larger saved storage: keep only its own elements
        return piece.contiguous()

    def _read_range(self, name: str, chunk: Chunk) -> bytes:
        try:
            fd = os.open(chunk.file, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{chunk.file}: is missing; the checkpoint's .metadata puts tensor '{name}' "
                                  "in it.") from None
        except OSError as exc:
            raise CheckpointError(f"{chunk.file}: cannot be opened ({exc.strerror or exc}).") from None
        try:
            parts, done = [], 0
            while done < chunk.length:  # one read returns at most ~2 GB on Linux
                got = os.pread(fd, chunk.length - done, chunk.start + done)
                if not got:
                    raise CheckpointError(f"{chunk.file}: is truncated: tensor '{name}' has a chunk at bytes "
                                          f"{chunk.start}-{chunk.start + chunk.length} but the file ends sooner.")
                parts.append(got)
                done += len(got)
        except OSError as exc:
            raise CheckpointError(f"{chunk.file}: reading tensor '{name}' failed ({exc.strerror or exc}).") from None
        finally:
            os.close(fd)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        # staging copies a tensor out slice by slice: read it once, hold it until its last byte or another tensor
        if self._held is None or self._held[0] != name:
            self._held = None
            self._held = (name, self.read(name).reshape(-1).view(torch.uint8))
        flat = self._held[1]
        out.copy_(flat[start:start + out.numel()])
        if start + out.numel() >= flat.numel():
            self._held = None

    def not_read(self) -> dict[str, str]:
        return dict(self.skipped)

    def close(self) -> None:
        self._held = None


def _ints(values) -> tuple[int, ...]:
    out = tuple(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise TypeError(f"not a tuple of ints: {values!r}")
    return out


def _not_weights(fqn, entry, md) -> str | None:
    """Why a state-dict entry is not a model weight to compare; None for a model tensor."""
    if not isinstance(fqn, str):
        return "not a named entry"
    if not hasattr(entry, "chunks"):
        return "not a tensor (pickled bytes: a step count, config or RNG state)"
    path = (getattr(md, "planner_data", None) or {}).get(fqn)
    top = str(path[0]) if isinstance(path, tuple) and path else fqn.split(".", 1)[0]
    if top in TRAINING_STATE:
        return f"training state ({top}), not model weights"
    return None


def _coverage(shape: tuple[int, ...], chunks: list[Chunk]) -> str | None:
    """What is wrong with how the chunks tile the shape ('leave part uncovered', 'overlap'); None when exact.

    The chunks' edges cut each dimension into intervals; every cell of that grid must lie in exactly one chunk.
    """
    if math.prod(shape) == 0:
        return None
    cuts = [sorted({0, n} | {c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks})
            for d, n in enumerate(shape)]
    count = torch.zeros([len(c) - 1 for c in cuts], dtype=torch.int32)
    for c in chunks:
        count[tuple(slice(cuts[d].index(o), cuts[d].index(o + s))
                    for d, (o, s) in enumerate(zip(c.offsets, c.sizes)))] += 1
    if bool((count == 0).any()):
        return "leave part uncovered"
    if bool((count > 1).any()):
        return "overlap"
    return None


MCORE_CONVERT = ("convert it to a Hugging Face checkpoint first with verl's model merger (python -m verl.model_merger "
                 "merge --backend megatron --local_dir <the actor folder> --target_dir <new folder>) or "
                 "Megatron-Core's own converter, and analyse that")


def _refuse_megatron_folder(folder: Path) -> None:
    """Megatron-Core's torch_dist checkpoints: common.pt and a metadata.json naming the backend beside .metadata."""
    marker = folder / "metadata.json"
    backend = None
    if marker.is_file():
        try:
            backend = json.loads(marker.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError):
            backend = None
    if backend or (folder / "common.pt").is_file():
        raise CheckpointError(f"{folder}: is a Megatron-Core distributed checkpoint ({backend or 'torch_dist'}) "
                              f"whose tensors carry mcore names and layouts; {MCORE_CONVERT}.")


def _refuse_megatron_names(folder: Path, tensors: dict[str, TensorInfo]) -> None:
    mcore = [n for n in tensors if canonical(n).startswith("decoder.") and any(p in n for p in MCORE_LINEARS)]
    if mcore:
        raise CheckpointError(f"{folder}: holds Megatron-Core tensors (such as '{mcore[0]}'), not Hugging Face "
                              f"ones; {MCORE_CONVERT}.")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
