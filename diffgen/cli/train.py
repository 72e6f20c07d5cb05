"""``diffgen train`` and ``diffgen train-classifier``: one shared body over the trainers."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from diffgen.cli.app import (DeviceOpt, JsonOpt, PrecisionOpt, app, emit_json, parse_ints,
                             parse_size, show_progress, stderr)
from diffgen.errors import DiffgenError, InvalidSetting
from diffgen.files import check_can_create

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for checkpoints and log.")]
DataOpt = Annotated[str, typer.Option(help="packaged (the 10k MNIST split inside diffgen), "
                                           "mnist (full 60k, downloaded once) or a folder with "
                                           "one sub-folder per class.")]
EpochsOpt = Annotated[Optional[int], typer.Option(min=1, help="Train for this many epochs "
                                                       "instead of --steps.")]
TrainBatchOpt = Annotated[int, typer.Option(help="Images per step.")]
WarmupOpt = Annotated[int, typer.Option(help="Linear learning-rate warm-up.")]
WeightDecayOpt = Annotated[float, typer.Option(help="AdamW decoupled weight decay.")]
ScheduleOpt = Annotated[str, typer.Option(help="Noise schedule: linear or cosine.")]
TimestepsOpt = Annotated[int, typer.Option("--timesteps", "-T", help="Diffusion steps T.")]
ImageSizeOpt = Annotated[str, typer.Option(help="H or HxW; image folders are resized.")]
ChannelsOpt = Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")]
BaseChannelsOpt = Annotated[int, typer.Option(help="Channels at full resolution.")]
MultOpt = Annotated[str, typer.Option(help="Channel multiplier per level.")]
ResBlocksOpt = Annotated[int, typer.Option(help="Residual blocks per level.")]
AttentionOpt = Annotated[str, typer.Option(help="Feature-map heights with self-attention; auto "
                                                "is the lowest level (7 for 28 x 28).")]
GroupsOpt = Annotated[int, typer.Option(help="GroupNorm groups.")]
DropoutOpt = Annotated[float, typer.Option(help="Dropout in residual blocks.")]
CheckpointOpt = Annotated[Optional[int], typer.Option(
    help="Steps between checkpoints [default: 1000].")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out; its saved "
                                                          "configs are used.")]
HoldoutOpt = Annotated[int, typer.Option(min=0, help="Keep the last N images of the data out "
                                                     "of training.")]
TrainSeedOpt = Annotated[int, typer.Option(help="Seed for initialisation and data order.")]


@app.command()
def train(
    ctx: typer.Context,
    out: OutOpt,
    data: DataOpt = "packaged",
    steps: Annotated[Optional[int], typer.Option(min=1, help="Total optimizer steps [default: "
                                                      "10000].")] = None,
    epochs: EpochsOpt = None,
    batch_size: TrainBatchOpt = 128,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 1e-3,
    warmup_steps: WarmupOpt = 500,
    weight_decay: WeightDecayOpt = 0.0,
    ema_decay: Annotated[float, typer.Option(help="EMA decay ceiling.")] = 0.9999,
    class_dropout: Annotated[float, typer.Option(
        help="Probability of training on the null class, which classifier-free guidance and "
             "--unconditional sample from.")] = 0.1,
    schedule: ScheduleOpt = "linear",
    timesteps: TimestepsOpt = 1000,
    image_size: ImageSizeOpt = "28",
    channels: ChannelsOpt = 1,
    base_channels: BaseChannelsOpt = 24,
    channel_mult: MultOpt = "1,2,4",
    num_res_blocks: ResBlocksOpt = 1,
    attention_resolutions: AttentionOpt = "auto",
    groups: GroupsOpt = 8,
    dropout: DropoutOpt = 0.0,
    checkpoint_every: CheckpointOpt = None,
    resume: ResumeOpt = False,
    holdout: HoldoutOpt = 0,
    seed: TrainSeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Train a class-conditional diffusion model (DDPM simple loss, EMA, checkpoints)."""
    from diffgen.training import Trainer

    run_training(ctx, Trainer, steps=10_000 if steps is None else steps,
                 default_steps=steps is None)


@app.command("train-classifier")
def train_classifier(
    ctx: typer.Context,
    out: OutOpt,
    data: DataOpt = "packaged",
    steps: Annotated[Optional[int], typer.Option(min=1, help="Total optimizer steps [default: "
                                                      "5000].")] = None,
    epochs: EpochsOpt = None,
    batch_size: TrainBatchOpt = 128,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 1e-3,
    warmup_steps: WarmupOpt = 200,
    weight_decay: WeightDecayOpt = 0.05,
    ema_decay: Annotated[float, typer.Option(help="EMA decay ceiling.")] = 0.999,
    schedule: ScheduleOpt = "linear",
    timesteps: TimestepsOpt = 1000,
    image_size: ImageSizeOpt = "28",
    channels: ChannelsOpt = 1,
    base_channels: BaseChannelsOpt = 24,
    channel_mult: MultOpt = "1,2,4",
    num_res_blocks: ResBlocksOpt = 1,
    attention_resolutions: AttentionOpt = "auto",
    groups: GroupsOpt = 8,
    dropout: DropoutOpt = 0.0,
    checkpoint_every: CheckpointOpt = None,
    resume: ResumeOpt = False,
    holdout: HoldoutOpt = 0,
    seed: TrainSeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Train the noisy classifier p(y | x_t, t) that classifier guidance steers with.

    Cross-entropy on digits noised to a uniform t; its noise schedule must match the diffusion
    model it will guide. With --holdout N, accuracy on the held-out images at t = 0, T/4, T/2,
    3T/4 and T - 1 is reported at the end.
    """
    from diffgen.training import ClassifierTrainer

    run_training(ctx, ClassifierTrainer, steps=5000 if steps is None else steps,
                 default_steps=steps is None, class_dropout=0.0)


def run_training(ctx: typer.Context, trainer_class, steps: int, default_steps: bool,
                 **fixed) -> None:
    """The body of ``train`` and ``train-classifier``: build or resume a run, then run it."""
    from diffgen import checkpoint
    from diffgen import device as devices
    from diffgen.data import load_dataset
    from diffgen.diffusion import ScheduleConfig
    from diffgen.training import TrainConfig, resume_trainer

    opts = {**ctx.params, **fixed}
    out, epochs = opts["out"], opts["epochs"]
    if not default_steps and epochs is not None:
        raise typer.BadParameter("give --steps or --epochs, not both", param_hint="--epochs")
    if opts["resume"]:
        given = [name for name in ctx.params if name not in RESUME_OPTIONS
                 and ctx.get_parameter_source(name).name != "DEFAULT"]
        if given:
            check_unchanged(out, {name: opts[name] for name in given})
    check_can_create(out)
    dev, prec = devices.resolve(opts["device"], opts["precision"])
    if opts["resume"]:
        trainer = resume_trainer(out, dev, prec, steps=None if default_steps else steps,
                                 epochs=epochs, checkpoint_every=opts["checkpoint_every"])
        if trainer.kind != trainer_class.kind:
            command = "train" if trainer.kind == checkpoint.KIND_UNET else "train-classifier"
            raise DiffgenError(f"--resume: {out} holds a {trainer.kind} run; resume it with "
                               f"diffgen {command}")
    else:
        size = parse_size(opts["image_size"])
        mult = parse_ints(opts["channel_mult"], "--channel-mult")
        attention = ((size[0] // 2 ** max(len(mult) - 1, 0),)
                     if opts["attention_resolutions"] == "auto"
                     else parse_ints(opts["attention_resolutions"], "--attention-resolutions"))
        model_config = dict(
            image_size=size, in_channels=opts["channels"], base_channels=opts["base_channels"],
            channel_mult=mult, num_res_blocks=opts["num_res_blocks"],
            attention_resolutions=attention, num_groups=opts["groups"],
            dropout=opts["dropout"], num_classes=10)
        trainer_class.config_class(**model_config)  # fail on a bad shape before loading data
        schedule_config = ScheduleConfig(schedule=opts["schedule"],
                                         num_timesteps=opts["timesteps"])
        if (out / checkpoint.MODEL_FILE).exists():
            raise DiffgenError(f"{out} already holds a model; use --resume to continue it or "
                               "choose another --out")
        data = opts["data"]
        if data not in ("packaged", "mnist"):
            data = str(Path(data).resolve())  # a resumed run finds it from any folder
        dataset = load_dataset(data, size, opts["channels"])
        model_config = trainer_class.config_class(
            **{**model_config, "num_classes": dataset.num_classes})
        usable = len(dataset) - opts["holdout"]
        train_config = TrainConfig(
            data=data, steps=steps_for(steps, epochs, max(usable, 1), opts["batch_size"]),
            batch_size=opts["batch_size"], lr=opts["lr"], warmup_steps=opts["warmup_steps"],
            weight_decay=opts["weight_decay"], ema_decay=opts["ema_decay"],
            class_dropout=opts["class_dropout"],
            checkpoint_every=(1000 if opts["checkpoint_every"] is None
                              else opts["checkpoint_every"]),
            seed=opts["seed"],
            holdout=opts["holdout"])
        trainer = trainer_class(model_config, schedule_config, train_config, dataset, out, dev,
                                prec)
    tic = time.perf_counter()
    # `kill` (SIGTERM) stops a run like Ctrl-C does: with a checkpoint of the last step.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        with train_progress(trainer.step, trainer.config.steps) as on_step:
            trainer.run(on_step)
    except KeyboardInterrupt:
        saved = (f"checkpoint saved in {out}" if trainer.model_path.is_file()
                 else "before the first step; nothing saved")
        stderr.print(f"interrupted at step {trainer.step}; {saved}", style="yellow")
        report_run(trainer, json_out=opts["json_out"], seconds=time.perf_counter() - tic,
                   interrupted=True)
        raise typer.Exit(130) from None
    report_run(trainer, opts["json_out"], time.perf_counter() - tic, trainer.final_report())


def saved_settings(ckpt) -> dict:
    """The options of a saved run, keyed and shaped as the command line gives them."""
    model, schedule, train = ckpt.model_config, ckpt.schedule_config, ckpt.train_config
    saved = {name: train[name] for name in ("data", "batch_size", "lr", "warmup_steps",
                                            "weight_decay", "ema_decay", "class_dropout",
                                            "seed", "holdout") if name in train}
    saved.update(schedule=schedule["schedule"], timesteps=schedule["num_timesteps"],
                 image_size=tuple(model["image_size"]), channels=model["in_channels"],
                 base_channels=model["base_channels"], channel_mult=tuple(model["channel_mult"]),
                 num_res_blocks=model["num_res_blocks"], groups=model["num_groups"],
                 dropout=model["dropout"],
                 attention_resolutions=tuple(model["attention_resolutions"]))
    return saved


def check_unchanged(out: Path, given: dict) -> None:
    """Options given with --resume must repeat the run's saved values."""
    from diffgen import checkpoint

    path = out / checkpoint.MODEL_FILE
    if not path.is_file():
        raise DiffgenError(f"--resume: no checkpoint in {out} (need {checkpoint.MODEL_FILE})")
    saved = saved_settings(checkpoint.load_model(path))
    for name, value in given.items():
        option = f"--{name.replace('_', '-')}"
        if name == "image_size":
            value = parse_size(value)
        elif name in ("channel_mult", "attention_resolutions"):
            value = (saved[name] if name == "attention_resolutions" and value == "auto"
                     else parse_ints(value, option))
        elif name == "data" and value not in ("packaged", "mnist"):
            value = str(Path(value).resolve())
        if name not in saved or value != saved[name]:
            was = f" differs from the run's saved {saved[name]}" if name in saved else ""
            raise InvalidSetting(
                f"{option}{was}: a resumed run keeps its saved settings; only --steps, "
                "--epochs, --checkpoint-every, --device and --precision may change")


def report_run(trainer, json_out: bool, seconds: float, extra: dict | None = None,
               interrupted: bool = False) -> None:
    """The run's files on stdout (or one JSON object): model, training state and log."""
    files = [str(p) for p in (trainer.model_path, trainer.state_path, trainer.log_path)
             if p.is_file()]
    if not json_out:
        if files:
            typer.echo("\n".join(files))
        return
    emit_json(True, {"out": str(trainer.out_dir), "files": files,
                     "model": str(trainer.model_path), "step": trainer.step,
                     "interrupted": interrupted, "seconds": round(seconds, 2), **(extra or {})})


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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
