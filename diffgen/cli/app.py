"""The ``diffgen`` command line: a thin layer that parses options and calls the engine.

Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error, 130 interrupted.
Progress and logs go to stderr; stdout carries only results (one JSON object with --json).
This module holds the application, its error handling, logging and the options every command
shares; ``train.py`` and ``generate.py`` hold the commands.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from diffgen import __version__
from diffgen.errors import DiffgenError, InvalidSetting

stderr = Console(stderr=True)
log = logging.getLogger("diffgen")


class DiffgenGroup(typer.core.TyperGroup):
    """Turns a DiffgenError anywhere below into a one-line message: exit 2 for an invalid
    setting (a usage error), 1 for any other failure."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except DiffgenError as err:
            fail(str(err), 2 if isinstance(err, InvalidSetting) else 1)
        except MemoryError:
            fail("out of memory; try a smaller --batch-size or image size", 1)
        except RuntimeError as err:
            if "out of memory" in str(err) or "can't allocate memory" in str(err):
                fail("out of memory; try a smaller --batch-size or image size", 1)
            raise


def fail(message: str, code: int) -> None:
    stderr.print(f"Error: {message}", style="red", markup=False, highlight=False,
                 soft_wrap=True)
    raise typer.Exit(code) from None


app = typer.Typer(cls=DiffgenGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Train and sample class-conditional diffusion models for small images.")


class StderrHandler(logging.Handler):
    """Plain log lines to whatever ``sys.stderr`` is when the record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # a logging failure must never stop a command
            self.handleError(record)


def setup_logging(verbose: bool, quiet: bool) -> None:
    """diffgen's own loggers at INFO (DEBUG with --verbose, WARNING with --quiet) on stderr;
    rich formatting on a terminal, plain unwrapped lines otherwise."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if stderr.is_terminal:
        handler: logging.Handler = RichHandler(console=stderr, show_time=False, show_path=False,
                                               markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("diffgen").setLevel(level)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"diffgen {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=version_callback,
                                          is_eager=True, help="Print the version and exit.")
                       ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Only warnings and errors; no progress bars.")
                     ] = False,
) -> None:
    """Train and sample class-conditional diffusion models for small images."""
    if verbose and quiet:
        raise typer.BadParameter("--verbose and --quiet exclude each other")
    setup_logging(verbose, quiet)


def show_progress() -> bool:
    return logging.getLogger("diffgen").getEffectiveLevel() <= logging.INFO and stderr.is_terminal


def emit_json(enabled: bool, payload: dict) -> None:
    if enabled:
        sys.stdout.write(json.dumps(payload) + "\n")


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); an empty string gives ()."""
    if not text.strip():
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers",
                                 param_hint=option) from None


def parse_size(text: str) -> tuple[int, int]:
    """'28' -> (28, 28); '28x32' -> (28, 32)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise typer.BadParameter(f"{text!r} is not a size like 28 or 28x32",
                                 param_hint="--image-size")
    return sizes[0], sizes[1]


DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, "
                                             "cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (bf16 where fast, else fp32), fp32, bf16 "
                                                "or fp16 (CUDA only).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def main() -> None:
    """The console entry point: every usage error as one line on stderr, exit code 2."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # Typer's usage errors carry format_message and exit_code
        if not hasattr(err, "format_message"):
            raise
        stderr.print(f"Error: {err.format_message()}", style="red", markup=False,
                     highlight=False, soft_wrap=True)
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
