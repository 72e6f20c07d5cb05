"""Writing a file so that a crash or a full disk never leaves a half-written one in its place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from diffgen.errors import DiffgenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the usual permissions (0666 less the umask); on any failure the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise DiffgenError(f"cannot write to {path.parent}: {err.strerror}") from None
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DiffgenError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    return path


def check_can_create(folder: Path) -> Path:
    """Check, without creating anything, that ``folder`` exists or could be made, writable."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise DiffgenError(f"cannot use {folder} as a folder: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DiffgenError(f"cannot write to folder {probe}: permission denied")
    return folder


def write_all(jobs: list[tuple[Path, Callable[[Path], Path]]]) -> list[Path]:
    """Run ``write(path)`` for every (path, write) pair; all of them or none.

    If one fails, the files this call created are removed again, and so are the folders it
    created for them, before the error goes on. (A file that existed before and was already
    replaced stays replaced: each single write is atomic, the set is not.)
    """
    created_files: list[Path] = []
    created_folders: list[Path] = []
    try:
        for path, write in jobs:
            path = Path(path)
            missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
            existed = path.exists()
            write(path)
            created_folders += [p for p in reversed(missing) if p not in created_folders]
            if not existed:
                created_files.append(path)
    except BaseException:
        for path in created_files:
            path.unlink(missing_ok=True)
        for folder in reversed(created_folders):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: something else is in it
        raise
    return [Path(path) for path, _ in jobs]
