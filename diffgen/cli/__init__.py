"""The ``diffgen`` command line (see ``app.py``); importing it registers every command."""

from diffgen.cli import train  # noqa: F401 - registers train and train-classifier first
from diffgen.cli import generate  # noqa: F401,I001 - then sample, trajectory, denoise, evaluate
from diffgen.cli.app import app, main

__all__ = ["app", "main"]
