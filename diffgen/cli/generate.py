"""The commands that sample a model: ``sample``, ``trajectory``, ``denoise`` and ``evaluate``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from diffgen.cli.app import (DeviceOpt, JsonOpt, PrecisionOpt, app, emit_json, log,
                             show_progress, stderr)
from diffgen.errors import InvalidSetting
from diffgen.files import check_can_create, write_all

WeightsOpt = Annotated[Optional[str], typer.Option(
    help="Model file from diffgen train, or hf://owner/repo/file.safetensors on the Hugging "
         "Face Hub [default: the shipped MNIST model].")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Sampler steps (model evaluations), at most "
                                                         "T.")]
DdimOpt = Annotated[bool, typer.Option("--ddim/--ddpm", help="DDIM (default) or DDPM "
                                                              "ancestral sampling.")]
EtaOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="DDIM noise: 0 deterministic, "
                                                                "1 DDPM-like.")]
VarianceOpt = Annotated[str, typer.Option(help="DDPM variance: small (posterior) or large "
                                               "(beta).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the first sample; sample i uses seed + i.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Largest batch sent through the model at "
                                                        "once.")]
ClassOpt = Annotated[Optional[list[int]], typer.Option(
    "--class", "-c", help="Class to sample; repeat for several [default: all classes].")]
RawOpt = Annotated[bool, typer.Option("--raw", help="Use the raw weights instead of the EMA "
                                                    "weights.")]
ClassifierScaleOpt = Annotated[float, typer.Option(
    help="Classifier guidance scale s: DDPM adds s * variance * grad log p(y | x_t) to "
                  "the mean, DDIM subtracts sqrt(1 - alpha_bar) * s * grad from eps; 0 is off. "
                  "0.5-1 for the conditional model, 5-10 with --unconditional.")]
ClassifierOpt = Annotated[Optional[str], typer.Option(
    help="Noisy classifier from diffgen train-classifier (or hf://...) [default: the shipped "
         "one].")]
CfgScaleOpt = Annotated[float, typer.Option(
    help="Classifier-free guidance scale W: eps = eps_uncond + W * (eps_cond - "
                  "eps_uncond). 1 is plain conditional sampling, 0 unconditional; the paper's "
                  "(1 + w) * eps_cond - w * eps_uncond is W = 1 + w.")]
UnconditionalOpt = Annotated[bool, typer.Option(
    "--unconditional", help="Sample the model's unconditional mode (the null class); with "
                            "--classifier-scale the classifier alone steers towards the class "
                            "asked for.")]


def prepare(steps: int, ddim: bool, eta: float, variance: str, weights: str | None, raw: bool,
            device: str, precision: str, classifier_scale: float = 0.0,
            classifier: str | None = None, cfg_scale: float = 1.0,
            unconditional: bool = False):
    """The sampler config, device, precision, loaded model and guidance of a sampling command.

    The classifier is loaded only when its scale is not 0.
    """
    from diffgen import device as devices
    from diffgen import pipeline
    from diffgen.sampling import Guidance, SamplerConfig

    config = SamplerConfig(method="ddim" if ddim else "ddpm", steps=steps, eta=eta,
                           variance=variance)
    Guidance.check(classifier_scale, cfg_scale, unconditional)  # before any loading
    if classifier is not None and classifier_scale == 0.0:
        log.warning("--classifier is unused without --classifier-scale")
    dev, prec = devices.resolve(device, precision)
    loaded = pipeline.load(weights, dev, ema=not raw)
    if (cfg_scale != 1.0 or unconditional) and loaded.train_config.get("class_dropout") == 0:
        log.warning("%s was trained with class dropout 0, so its null class (used by "
                    "--cfg-scale and --unconditional) never learned anything", loaded.path)
    net = (pipeline.load_classifier(classifier, loaded, dev) if classifier_scale != 0.0
           else None)
    return config, dev, prec, loaded, Guidance(net, classifier_scale, cfg_scale, unconditional)


def label_name(label: int, null_class: int) -> str:
    return "uncond" if label == null_class else f"class{label}"


def json_classes(labels: list[int], null_class: int) -> list[int | None]:
    """Labels for --json: the null class (unconditional samples) as null."""
    return [None if k == null_class else k for k in labels]


def is_guided(classifier_scale: float, cfg_scale: float, unconditional: bool = False) -> bool:
    """Whether any guidance option differs from plain conditional sampling."""
    return classifier_scale != 0.0 or cfg_scale != 1.0 or unconditional


class step_progress:  # noqa: N801
    """A progress bar over sampler steps of all batches (hidden when not on a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.progress = Progress(TextColumn(label), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} steps"),
                                 TimeRemainingColumn(), console=stderr,
                                 disable=not show_progress(), transient=True)
        self.total = total

    def __enter__(self):
        self.progress.start()
        task = self.progress.add_task(" ", total=self.total)
        return lambda state: self.progress.advance(task)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


@app.command("sample")
def sample_cmd(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG grid to write (one "
                                                "row per class when several).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Folder for one PNG per sample, "
                                                    "named index_class_seed.png.")] = None,
    classes: ClassOpt = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Samples per class.")] = 8,
    steps: StepsOpt = 50,
    ddim: DdimOpt = True,
    eta: EtaOpt = 0.0,
    variance: VarianceOpt = "small",
    seed: SeedOpt = 0,
    weights: WeightsOpt = None,
    raw: RawOpt = False,
    classifier_scale: ClassifierScaleOpt = 0.0,
    classifier: ClassifierOpt = None,
    cfg_scale: CfgScaleOpt = 1.0,
    unconditional: UnconditionalOpt = False,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Sample digits: a PNG grid with -o, one PNG per sample with --out-dir."""
    from diffgen import images, pipeline

    if out is None and out_dir is None:
        raise typer.BadParameter("give -o FILE.png and/or --out-dir DIR", param_hint="--out")
    if out is not None:
        images.check_output(out, (".png",))
    if out_dir is not None:
        check_can_create(out_dir)
        if out_dir.is_dir() and any(out_dir.glob("*.png")):
            log.warning("%s already holds PNG files; samples of this run are added to them, "
                        "and files of the same name are replaced", out_dir)
    config, dev, prec, loaded, guidance = prepare(
        steps, ddim, eta, variance, weights, raw, device, precision, classifier_scale,
        classifier, cfg_scale, unconditional)
    config.check(loaded.diffusion.num_timesteps)
    labels = pipeline.guided_labels(loaded, classes or [], n, guidance)
    seeds = pipeline.seeds_for(seed, len(labels))
    batches = -(-len(labels) // batch_size)
    log.info("sampling %d images in %d batch(es) of at most %d", len(labels), batches, batch_size)
    tic = time.perf_counter()
    with step_progress(batches * min(steps, loaded.diffusion.num_timesteps), "sampling") as cb:
        samples = pipeline.generate(loaded, labels, seeds, config, dev, prec, batch_size, cb,
                                    guidance)
    seconds = time.perf_counter() - tic
    jobs = []
    if out is not None:
        ncol = n if len(set(labels)) > 1 else min(len(labels), 8)
        jobs.append((out, lambda path: images.save_grid(samples, path, ncol)))
    if out_dir is not None:
        for i, (image, label, s) in enumerate(zip(samples, labels, seeds)):
            name = out_dir / f"{i:04d}_{label_name(label, loaded.model.null_class)}_seed{s}.png"
            jobs.append((name, lambda path, image=image: images.save_image(image, path)))
    files = [str(p) for p in write_all(jobs)]
    log.info("%d samples in %.1f s (%.1f img/s)", len(labels), seconds, len(labels) / seconds)
    if not json_out:
        typer.echo("\n".join(files))
    emit_json(json_out, {"files": files,
                         "classes": json_classes(labels, loaded.model.null_class),
                         "seeds": seeds, "classifier_scale": classifier_scale,
                         "cfg_scale": cfg_scale, "unconditional": unconditional,
                         "seconds": round(seconds, 3), "weights": str(loaded.path),
                         "device": str(dev), "precision": prec.name})


@app.command()
def trajectory(
    out: Annotated[Path, typer.Option("--out", "-o", help="GIF of the path, or PNG for a "
                                                          "strip of its frames.")],
    classes: ClassOpt = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Samples per class.")] = 1,
    frames: Annotated[int, typer.Option(min=2, help="Frames, noise and final image "
                                                        "included.")] = 26,
    frame_ms: Annotated[int, typer.Option(help="Milliseconds per GIF frame (multiple of "
                                               "10, at least 20).")] = 80,
    hold_ms: Annotated[int, typer.Option(help="Extra time on the last GIF frame.")] = 1500,
    show_x0: Annotated[bool, typer.Option("--show-x0", help="Show the predicted x_0 beside "
                                                            "each x_t.")] = False,
    forward: Annotated[bool, typer.Option("--forward", help="Show real digits being noised "
                                                            "by q(x_t | x_0) instead.")] = False,
    steps: StepsOpt = 50,
    ddim: DdimOpt = True,
    eta: EtaOpt = 0.0,
    variance: VarianceOpt = "small",
    seed: SeedOpt = 0,
    weights: WeightsOpt = None,
    raw: RawOpt = False,
    classifier_scale: ClassifierScaleOpt = 0.0,
    classifier: ClassifierOpt = None,
    cfg_scale: CfgScaleOpt = 1.0,
    unconditional: UnconditionalOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Draw the diffusion path of a grid of samples as a GIF (or a PNG strip)."""
    import torch

    from diffgen import images, pipeline

    images.check_output(out, (".gif", ".png"))
    if out.suffix.lower() == ".gif":
        frame_ms = images.frame_duration(frame_ms, hold_ms)
    if forward and show_x0:
        raise typer.BadParameter("--show-x0 applies to the reverse path only",
                                 param_hint="--show-x0")
    if forward and is_guided(classifier_scale, cfg_scale, unconditional):
        raise InvalidSetting("guidance applies to the reverse path only, not to --forward")
    config, dev, prec, loaded, guidance = prepare(
        steps, ddim, eta, variance, weights, raw, device, precision, classifier_scale,
        classifier, cfg_scale, unconditional)
    labels = pipeline.guided_labels(loaded, classes or [], n, guidance)
    seeds = pipeline.seeds_for(seed, len(labels))
    ncol = n if len(set(labels)) > 1 else min(len(labels), 8)
    ncol = len(labels) if len(labels) <= 10 and n == 1 else ncol
    tic = time.perf_counter()
    if not forward and frames > steps + 1:
        log.warning("%d steps give at most %d frames", steps, steps + 1)
    if forward:
        from diffgen.data import load_dataset

        # Real images from the data the model was trained on, at its size and channels.
        source = loaded.train_config.get("data", "packaged")
        real = load_dataset(source, loaded.config.image_size, loaded.config.in_channels)
        x_0 = real_examples(real, labels, seed)
        x_t_frames, shown = pipeline.forward_trajectory(loaded.diffusion, x_0, seeds, frames)
        grids = [images.make_grid(x, ncol) for x in x_t_frames]
    else:
        x_t_frames, x_0_frames, shown = pipeline.reverse_trajectory(
            loaded, labels, seeds, config, dev, prec, frames, guidance)
        grids = [images.make_grid(x, ncol) for x in x_t_frames]
        if show_x0:
            grids = [torch.cat([g, images.make_grid(x0, ncol)], dim=2)
                     for g, x0 in zip(grids, x_0_frames)]
    if out.suffix.lower() == ".gif":
        write_all([(out, lambda path: images.save_gif(grids, path, frame_ms, hold_ms))])
    else:
        write_all([(out, lambda path: images.save_atomic(images.to_pil(torch.cat(grids, dim=2)),
                                                         path))])
    seconds = time.perf_counter() - tic
    if not json_out:
        typer.echo(out)
    emit_json(json_out, {"files": [str(out)], "frames": len(grids), "timesteps": shown,
                         "classes": json_classes(labels, loaded.model.null_class),
                         "seeds": seeds, "classifier_scale": classifier_scale,
                         "cfg_scale": cfg_scale, "unconditional": unconditional,
                         "seconds": round(seconds, 3)})


def real_examples(dataset, labels: list[int], seed: int):
    """One real image per requested label, picked with ``seed``, in [-1, 1]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    picks = []
    for label in labels:
        candidates = (dataset.labels == label).nonzero().flatten()
        picks.append(candidates[torch.randint(len(candidates), (1,), generator=gen)].item())
    return dataset.images[picks].float() / 127.5 - 1.0


@app.command("denoise")
def denoise_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Image files to denoise.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output PNG (one "
                                                                    "input).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Folder for one result per input, "
                                                    "under the input's name.")] = None,
    strength: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="How far to noise, 0 (keep the input) to 1 (pure noise) "
                               "[default: 0.5].")] = None,
    t: Annotated[Optional[int], typer.Option("--t", min=0, help="Noise to this timestep "
                                                                "instead of --strength.")] = None,
    strip: Annotated[bool, typer.Option("--strip", help="Write input, noised and denoised "
                                                        "side by side.")] = False,
    classes: Annotated[Optional[int], typer.Option("--class", "-c", help="Class to steer "
                                                   "towards [default: unconditional].")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Sampler steps for a full path; scaled by the "
                                            "strength.")] = 50,
    ddim: DdimOpt = True,
    eta: EtaOpt = 0.0,
    variance: VarianceOpt = "small",
    seed: SeedOpt = 0,
    weights: WeightsOpt = None,
    raw: RawOpt = False,
    classifier_scale: ClassifierScaleOpt = 0.0,
    classifier: ClassifierOpt = None,
    cfg_scale: CfgScaleOpt = 1.0,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Noise images part of the way and denoise them back (SDEdit)."""
    import torch

    from diffgen import images, pipeline

    if (out is None) == (out_dir is None):
        raise typer.BadParameter("give either -o FILE.png (one input) or --out-dir DIR",
                                 param_hint="--out")
    if out is not None and len(inputs) > 1:
        raise typer.BadParameter(f"{len(inputs)} inputs need --out-dir, not -o",
                                 param_hint="--out")
    if strength is not None and t is not None:
        raise typer.BadParameter("give --strength or --t, not both", param_hint="--t")
    if strength is None and t is None:
        strength = 0.5
    if out is not None:
        targets = [images.check_output(out, (".png",))]
    else:
        targets = [check_can_create(out_dir) / f"{p.stem}.png" for p in inputs]
    check_targets(inputs, targets)
    if classes is None and is_guided(classifier_scale, cfg_scale):
        raise InvalidSetting("guidance steers towards a class; give --class")
    config, dev, prec, loaded, guidance = prepare(
        steps, ddim, eta, variance, weights, raw, device, precision, classifier_scale,
        classifier, cfg_scale)
    start = pipeline.strength_to_t(strength, t, loaded.diffusion.num_timesteps)
    if classes is not None:
        pipeline.class_labels(loaded, [classes], 1)
    label = loaded.model.null_class if classes is None else classes
    x_0 = torch.stack([images.load_image(p, loaded.config.in_channels, loaded.config.image_size)
                       for p in inputs])
    seeds = pipeline.seeds_for(seed, len(inputs))
    tic = time.perf_counter()
    noised, result = pipeline.denoise(loaded, x_0, [label] * len(inputs), seeds, start, config,
                                      dev, prec, batch_size, guidance)
    seconds = time.perf_counter() - tic
    jobs = []
    for target, original, noisy, clean in zip(targets, x_0, noised, result):
        image = images.make_grid(torch.stack([original, noisy, clean]), 3) if strip else clean
        jobs.append((target, lambda path, image=image: images.save_image(image, path)))
    files = [str(p) for p in write_all(jobs)]
    if not json_out:
        typer.echo("\n".join(files))
    emit_json(json_out, {"files": files, "t_start": start, "seeds": seeds,
                         "classifier_scale": classifier_scale, "cfg_scale": cfg_scale,
                         "seconds": round(seconds, 3)})


SAMPLING_ONLY = ("n", "steps", "ddim", "eta", "variance", "seed", "raw", "batch_size", "device",
                 "precision")


@app.command()
def evaluate(
    ctx: typer.Context,
    weights: WeightsOpt = None,
    images_dir: Annotated[Optional[Path], typer.Option(
        "--images", help="Rate the images in this folder instead of sampling: classes from "
                         "sub-folders 0..9, or from names like 0007_class3_seed7.png.")] = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Samples per class.")] = 100,
    steps: StepsOpt = 50,
    ddim: DdimOpt = True,
    eta: EtaOpt = 0.0,
    variance: VarianceOpt = "small",
    seed: SeedOpt = 0,
    raw: RawOpt = False,
    classifier_scale: ClassifierScaleOpt = 0.0,
    classifier: ClassifierOpt = None,
    cfg_scale: CfgScaleOpt = 1.0,
    unconditional: UnconditionalOpt = False,
    judge: Annotated[Optional[Path], typer.Option(help="Digit judge file [default: the shipped "
                                                       "judge].")] = None,
    batch_size: BatchOpt = 100,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Rate samples offline: judge accuracy, Fréchet distance, precision/recall, diversity.

    Samples n digits per class (or reads --images) and scores them, and as the floor as many
    real digits, against the 2,000 held-out real digits with the shipped digit judge.
    """
    from diffgen import pipeline, quality
    from diffgen.judge import NUM_CLASSES, load_judge

    if images_dir is not None:
        sampling = [name for name, value in (("--weights", weights), ("--classifier", classifier))
                    if value is not None]
        if is_guided(classifier_scale, cfg_scale, unconditional):
            sampling.append("a guidance option")
        sampling += [{"ddim": "--ddim/--ddpm"}.get(name, f"--{name.replace('_', '-')}")
                     for name in SAMPLING_ONLY
                     if ctx.get_parameter_source(name).name != "DEFAULT"]
        if sampling:
            raise InvalidSetting(f"{sampling[0]} applies to sampling, not to --images")
        found = quality.read_images(images_dir)
        log.info("read %d images from %s (%s)", len(found.images), found.source,
                 "labelled" if found.labels else "no classes")
        result = {"images": found.source, **quality.evaluate_with_floor(
            found.images, found.labels, load_judge(judge))}
    else:
        config, dev, prec, loaded, guidance = prepare(
            steps, ddim, eta, variance, weights, raw, device, precision, classifier_scale,
            classifier, cfg_scale, unconditional)
        the_judge = load_judge(judge)
        total = -(-n * NUM_CLASSES // batch_size) * steps
        with step_progress(total, "sampling") as cb:
            result = pipeline.evaluate(loaded, config, guidance, n, seed, dev, prec, batch_size,
                                       the_judge, cb)
    if json_out:
        emit_json(True, result)
        return
    if images_dir is None:
        run = result["sampling"]
        typer.echo(f"{run['weights']} (step {run['step']}): {n} per class, "
                   f"{run['sampler']} {steps} steps, {run['precision']}, classifier scale "
                   f"{classifier_scale:g}, cfg scale {cfg_scale:g}"
                   f"{', unconditional' if unconditional else ''}; {run['images_per_s']:.1f} "
                   "img/s")
    else:
        typer.echo(f"{result['images']}: {result['n']} images")
    typer.echo(quality.format_table(result))


def check_targets(inputs: list[Path], targets: list[Path]) -> None:
    """No two results may land on one file, and no result may overwrite an input."""
    seen: dict[Path, Path] = {}
    for source, target in zip(inputs, targets):
        key = target.resolve()
        if key in seen:
            raise InvalidSetting(f"{seen[key]} and {source} would both be written to {target}; "
                                 "rename one or denoise them separately")
        seen[key] = source
    sources = {p.resolve() for p in inputs}
    for target in targets:
        if target.resolve() in sources:
            raise InvalidSetting(f"the result {target} would overwrite an input; choose another "
                                 "output")
