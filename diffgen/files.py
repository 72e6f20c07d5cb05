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


def check_folder(folder: Path) -> Path:
    """Create ``folder`` if needed and check that files can be written into it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DiffgenError(f"cannot use {folder} as a folder: a file is in the way") from None
    except OSError as err:
        raise DiffgenError(f"cannot create folder {folder}: {err.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DiffgenError(f"cannot write to folder {folder}: permission denied")
    return folder
