"""torch.save files loaded with weights_only=True under an explicit allow-list: a class outside the list is refused
before it runs, and every failure becomes one sentence that names the file (and the refused class)."""

from __future__ import annotations

import pickle
import re
import struct
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from rlsub_tui.util.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive; older torch wrote a bare pickle
_LOAD_LOCK = threading.Lock()
# what torch.load raises on a damaged file besides UnpicklingError (the weights-only unpickler's refusals)
_DAMAGED = (OSError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError, struct.error)


@contextmanager
def only_allowed(allowed: list):
    """While a file loads, torch's user allow-list is exactly `allowed` (stubs under the names they stand for):
    importing torch.distributed.tensor adds the real DTensor and DeviceMesh under the same names, and which of two
    entries of one name wins is chance. One lock for every reader: the allow-list is global."""
    with _LOAD_LOCK:
        saved = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        try:
            with torch.serialization.safe_globals(allowed):
                yield
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)


def load_restricted(file: Path, allowed: list, admitted: str, read_as: str = "a PyTorch checkpoint"):
    """What `file` holds, loaded on the CPU with only `allowed` beyond plain tensors (memory-mapped when it is a zip
    archive). A refusal says the refused class "is {admitted}" ("neither a tensor nor a DTensor shard"); any other
    failure says the file cannot be read as `read_as`."""
    try:
        with only_allowed(allowed):
            if _starts_as_zip(file):
                return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(file, map_location="cpu", weights_only=True)  # a bare pickle cannot be memory-mapped
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{file}: refused to load: it holds {refused_class(exc)}, which is {admitted}; nothing "
                              "in it was run.") from None
    except _DAMAGED as exc:
        if _starts_as_zip(file) and not zipfile.is_zipfile(file):  # a zip's directory is its last bytes
            raise CheckpointError(f"{file}: is not a whole torch.save archive (its zip directory, at the end, is "
                                  "missing): truncated or still being written?") from None
        if not _starts_as_zip(file):
            raise CheckpointError(f"{file}: cannot be read as {read_as}: it is neither a torch.save zip archive nor "
                                  f"an older torch.save pickle ({first_line(exc)}).") from None
        raise CheckpointError(f"{file}: cannot be read as {read_as} ({first_line(exc)}).") from None


def _starts_as_zip(file: Path) -> bool:
    try:
        with open(file, "rb") as fh:
            return fh.read(4) == ZIP_MAGIC
    except OSError:
        return False  # torch.load says why it cannot be opened


def refused_class(exc: Exception) -> str:
    """The global the weights-only unpickler refused ('posix.system'), else the first line of its complaint."""
    text = str(exc)
    m = re.search(r"GLOBAL (\S+)", text) or re.search(r"(?:function|got) (<[^>]+>)", text)
    return m.group(1) if m else (text.strip().splitlines() or ["content we do not allow"])[0][:200]


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
