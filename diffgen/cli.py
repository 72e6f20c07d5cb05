"""The ``diffgen`` command line: a thin layer that parses options and calls the engine.

Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error, 130 interrupted.
Progress and logs go to stderr; stdout carries only results (one JSON object with --json).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from diffgen import __version__
from diffgen.errors import DiffgenError

stderr = Console(stderr=True)
log = logging.getLogger("diffgen")


class DiffgenGroup(typer.core.TyperGroup):
    """Turns a DiffgenError anywhere below into a one-line message and exit code 1."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except DiffgenError as err:
            stderr.print(f"Error: {err}", style="red", markup=False, highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(cls=DiffgenGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Train and sample class-conditional diffusion models for small images.")


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


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
    return logging.getLogger().level <= logging.INFO and stderr.is_terminal


def emit_json(enabled: bool, payload: dict) -> None:
    if enabled:
        sys.stdout.write(json.dumps(payload) + "\n")


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); an empty string gives ()."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
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


@app.command()
def train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for checkpoints and log.")],
    data: Annotated[str, typer.Option(help="packaged (the 10k MNIST split inside diffgen), "
                                           "mnist (full 60k, downloaded once) or a folder "
                                           "with one sub-folder per class.")] = "packaged",
    steps: Annotated[Optional[int], typer.Option(help="Total optimizer steps.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Train for this many epochs instead "
                                                       "of --steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warm-up.")] = 500,
    ema_decay: Annotated[float, typer.Option(help="EMA decay ceiling.")] = 0.9999,
    schedule: Annotated[str, typer.Option(help="Noise schedule: linear or cosine.")] = "linear",
    timesteps: Annotated[int, typer.Option("--timesteps", "-T",
                                           help="Diffusion steps T.")] = 1000,
    image_size: Annotated[str, typer.Option(help="H or HxW; image folders are resized.")
                          ] = "28",
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = 1,
    base_channels: Annotated[int, typer.Option(help="U-Net channels at full resolution.")] = 24,
    channel_mult: Annotated[str, typer.Option(help="Channel multiplier per level.")] = "1,2,4",
    num_res_blocks: Annotated[int, typer.Option(help="Residual blocks per level.")] = 1,
    attention_resolutions: Annotated[str, typer.Option(help="Feature-map heights with "
                                                            "self-attention.")] = "7",
    groups: Annotated[int, typer.Option(help="GroupNorm groups.")] = 8,
    dropout: Annotated[float, typer.Option(help="Dropout in residual blocks.")] = 0.0,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Steps between checkpoints [default: 1000].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out; its "
                                                          "saved configs are used.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Train a class-conditional diffusion model (DDPM simple loss, EMA, checkpoints)."""
    from diffgen import device as devices
    from diffgen.data import load_dataset
    from diffgen.diffusion import ScheduleConfig
    from diffgen.training import TrainConfig, Trainer, resume_trainer
    from diffgen.unet import UNetConfig

    if steps is not None and epochs is not None:
        raise typer.BadParameter("give --steps or --epochs, not both", param_hint="--epochs")
    if resume:
        fixed = [name for name in ctx.params if name not in RESUME_OPTIONS
                 and ctx.get_parameter_source(name).name != "DEFAULT"]
        if fixed:
            raise typer.BadParameter(
                f"--{fixed[0].replace('_', '-')} cannot change on --resume; the run's saved "
                "configs are used", param_hint="--resume")
    dev, prec = devices.resolve(device, precision)
    if resume:
        trainer = resume_trainer(out, dev, prec, steps=steps, epochs=epochs,
                                 checkpoint_every=checkpoint_every)
    else:
        size = parse_size(image_size)
        model_config = UNetConfig(
            image_size=size, in_channels=channels, base_channels=base_channels,
            channel_mult=parse_ints(channel_mult, "--channel-mult"),
            num_res_blocks=num_res_blocks,
            attention_resolutions=parse_ints(attention_resolutions, "--attention-resolutions"),
            num_groups=groups, dropout=dropout, num_classes=10)
        schedule_config = ScheduleConfig(schedule=schedule, num_timesteps=timesteps)
        if (out / "model.safetensors").exists():
            raise DiffgenError(f"{out} already holds a model; use --resume to continue it or "
                               "choose another --out")
        dataset = load_dataset(data, size, channels)
        model_config = UNetConfig(**{**model_config.to_dict(),
                                     "num_classes": dataset.num_classes})
        train_config = TrainConfig(
            data=data, steps=steps_for(steps, epochs, len(dataset), batch_size),
            batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay,
            checkpoint_every=checkpoint_every or 1000, seed=seed)
        trainer = Trainer(model_config, schedule_config, train_config, dataset, out, dev, prec)
    tic = time.perf_counter()
    try:
        with train_progress(trainer.step, trainer.config.steps) as on_step:
            final_step = trainer.run(on_step)
    except KeyboardInterrupt:
        stderr.print(f"interrupted at step {trainer.step}; checkpoint saved in {out}",
                     style="yellow")
        raise typer.Exit(130) from None
    emit_json(json_out, {"out": str(out), "model": str(trainer.model_path),
                         "step": final_step, "seconds": round(time.perf_counter() - tic, 2)})


RESUME_OPTIONS = {"out", "resume", "steps", "epochs", "checkpoint_every", "device", "precision",
                  "json_out"}


def steps_for(steps: int | None, epochs: int | None, num_images: int, batch_size: int) -> int:
    if epochs is not None:
        if epochs < 1:
            raise typer.BadParameter(f"must be at least 1, got {epochs}", param_hint="--epochs")
        return epochs * max(1, num_images // batch_size)
    return 10_000 if steps is None else steps


class train_progress:  # noqa: N801 - used as a context manager, reads like a function
    """A rich progress bar over training steps showing loss and images/s; None when hidden."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total = start, total
        self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("{task.fields[speed]} img/s"),
                                 TimeRemainingColumn(), console=stderr,
                                 disable=not show_progress())

    def __enter__(self):
        self.progress.start()
        task = self.progress.add_task("train", total=self.total, completed=self.start,
                                      loss="-", speed="-")

        def on_step(stats) -> None:
            self.progress.update(task, completed=stats.step, loss=f"{stats.loss:.4f}",
                                 speed=f"{stats.images_per_s:.0f}")

        return on_step

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def main() -> None:
    app()
