"""Atomic writes: a file or folder appears whole at its path or not at all, with the mode the umask gives."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask (read by setting and restoring it: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path next to `path`, renamed onto it when the block succeeds and removed when it fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the file should look like any other
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, text: str) -> None:
    """Write text (UTF-8, newlines as given) so that a reader finds the old file or the new, never half."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


@contextmanager
def atomic_directories(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary directories next to each of `paths`, moved into place (replacing what is there) on success.

    On failure every temporary directory is removed and the targets are left as they were.
    """
    temps = []
    try:
        for p in paths:
            temps.append(Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)))
            os.chmod(temps[-1], 0o777 & ~umask())
        yield temps
        for tmp, target in zip(temps, paths):
            _replace_directory(tmp, target)
    except BaseException:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "previous")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
