"""Where the files shipped in ``weights/`` are, installed or in a source checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from diffgen.errors import DiffgenError


def shipped_file(name: str, option: str = "--weights") -> Path:
    """Path of a file shipped in ``weights/``.

    An installed diffgen carries it as the package ``diffgen.weights``; a source checkout run
    in place (``python -m pytest`` from the repository root) has it beside the package.
    """
    try:
        path = Path(str(resources.files("diffgen.weights") / name))
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parent.parent / "weights" / name
    if not path.is_file():
        raise DiffgenError(f"the shipped file {path} is missing; reinstall diffgen or pass "
                           f"{option}")
    return path
