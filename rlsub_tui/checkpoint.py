"""Checkpoint layouts: find a model's tensors from headers and read them one at a time.

Nothing outside this module knows about files: the analysis sees `name -> tensor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsub_tui.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}

# A header larger than this is not a real safetensors header (real ones are a few MB).
MAX_HEADER_BYTES = 256 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from the header alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file` (safetensors) or position in the state dict (pickle)
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; raise CheckpointError on anything malformed."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header size).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{file}: header size {header_len} is larger than the file ({size} bytes); "
                    "the file is truncated or not a safetensors file."
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: header size {header_len} bytes is implausibly large.")
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc}).") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object.")
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"{file}: tensor '{name}' has a malformed header entry.")
        dtype_name = entry.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unknown dtype {dtype_name!r}.")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{file}: tensor '{name}' has an invalid shape {shape!r}.")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise CheckpointError(f"{file}: tensor '{name}' has invalid data_offsets {offsets!r}.")
        begin, end = offsets
        dtype = SAFETENSORS_DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        if begin < 0 or end < begin or end > data_size:
            raise CheckpointError(
                f"{file}: tensor '{name}' data_offsets [{begin}, {end}] fall outside the "
                f"{data_size} bytes of data; the file is truncated or corrupt."
            )
        if end - begin != numel * _element_size(dtype):
            raise CheckpointError(
                f"{file}: tensor '{name}' occupies {end - begin} bytes but shape {shape} of "
                f"{dtype_name} needs {numel * _element_size(dtype)}."
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, dtype, tuple(shape), file, data_start + begin, end - begin)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1 and e0 > b0:
            raise CheckpointError(f"{file}: tensors '{n0}' and '{n1}' overlap in the data section.")
    return infos


def _header_digest(file: Path) -> str:
    """Hash of a file's first bytes (the header for safetensors); cheap, and changes with content layout."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        head = fh.read(8)
        h.update(head)
        if file.suffix == ".safetensors" and len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            h.update(fh.read(min(n, MAX_HEADER_BYTES)))
        else:
            h.update(fh.read(1 << 16))
    return h.hexdigest()


class Checkpoint:
    """One model checkpoint on disk: the tensor directory from headers, and reads one tensor at a time."""

    def __init__(self, source: str, label: str, files: list[Path], layout: str):
        self.source = source
        self.label = label
        self.files = files
        self.layout = layout
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._fds: dict[Path, int] = {}
        if layout == "safetensors":
            for file in files:
                for name, info in read_safetensors_header(file).items():
                    if name in self.tensors:
                        raise CheckpointError(f"{file}: tensor '{name}' also appears in {self.tensors[name].file}.")
                    self.tensors[name] = info
        else:
            for file in files:
                state = _load_pickle(file)
                self._pickled[file] = state
                for pos, (name, t) in enumerate(state.items()):
                    if name in self.tensors:
                        raise CheckpointError(f"{file}: tensor '{name}' also appears in {self.tensors[name].file}.")
                    nbytes = t.numel() * t.element_size()
                    self.tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), file, pos, nbytes)
        if not self.tensors:
            raise CheckpointError(f"{source}: the checkpoint holds no tensors.")

    @property
    def path(self) -> str:
        return self.source

    def fingerprint(self) -> str:
        """Identity of the checkpoint's bytes for caching: every file's path, size, mtime and header."""
        h = hashlib.sha256()
        for file in sorted(self.files):
            st = file.stat()
            h.update(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
            h.update(_header_digest(file).encode())
        return h.hexdigest()

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Read one tensor (optionally only its first `rows` rows) into CPU memory."""
        info = self.tensors[name]
        if self.layout != "safetensors":
            t = self._pickled[info.file][name]
            t = t[:rows] if rows is not None else t
            return t.contiguous().clone()
        shape = info.shape
        nbytes = info.nbytes
        if rows is not None and shape:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            shape = (rows,) + shape[1:]
            nbytes = row_bytes * rows
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        # torch.empty does not touch the memory (a bytearray would zero it while holding the GIL,
        # stalling the UI thread for a large tensor); reads go straight into it.
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd = self._fd(info.file)
        done = 0
        while done < nbytes:  # one read returns at most ~2 GB on Linux
            try:
                got = os.preadv(fd, [view[done:]], info.offset + done)
            except OSError as exc:
                raise CheckpointError(f"{info.file}: reading tensor '{name}' failed ({exc.strerror or exc}).") from None
            if got <= 0:
                raise CheckpointError(f"{info.file}: tensor '{name}' is cut short; the file is truncated.")
            done += got
        return buf.view(info.dtype).reshape(shape)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot be opened ({exc.strerror or exc}).") from None
            self._fds[file] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch pickle with weights_only=True: a pickle that would run code is refused."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise CheckpointError(
            f"{file}: refused to load: this pickle holds more than plain tensors and would run code "
            f"if unpickled (loaded with weights_only=True: {first})"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{file}: cannot be read as a PyTorch checkpoint ({_short(exc)}).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: is not a state dict of named tensors.")
    return state


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# Finding a checkpoint from what the user typed


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


def open_checkpoint(source: str, label: str | None = None) -> Checkpoint:
    """Open what the user named: a model directory, one weights file, or a model id in the local HF cache."""
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
    label = label or path.name
    if path.is_file():
        if path.suffix == ".safetensors":
            return Checkpoint(source, label, [path], "safetensors")
        if path.suffix in PICKLE_SUFFIXES:
            return Checkpoint(source, label, [path], "pickle")
        if path.name.endswith(".index.json"):
            return _from_index(source, label, path)
        raise CheckpointError(f"{source}: is not a .safetensors, .bin or index file.")
    if not path.is_dir():
        raise CheckpointError(f"{source}: is neither a file nor a directory.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{source}: directory cannot be read (permission denied).")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            return _from_index(source, label, path / index_name)
    if (path / "model.safetensors").is_file():
        return Checkpoint(source, label, [path / "model.safetensors"], "safetensors")
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return Checkpoint(source, label, singles, "safetensors")
    if (path / "pytorch_model.bin").is_file():
        return Checkpoint(source, label, [path / "pytorch_model.bin"], "pickle")
    if len(singles) > 1:
        raise CheckpointError(
            f"{source}: holds {len(singles)} .safetensors files but no model.safetensors.index.json to join them."
        )
    raise CheckpointError(
        f"{source}: holds no checkpoint (no model.safetensors, shard index or pytorch_model.bin)."
    )


def _from_index(source: str, label: str, index: Path) -> Checkpoint:
    shards = _resolve_index(index)
    layout = "safetensors" if all(s.suffix == ".safetensors" for s in shards) else "pickle"
    if layout == "pickle" and not all(s.suffix in PICKLE_SUFFIXES for s in shards):
        raise CheckpointError(f"{index}: mixes safetensors and pickle shards.")
    return Checkpoint(source, label, shards, layout)
