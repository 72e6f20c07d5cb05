"""Benchmark diffgen's U-Net against a diffusers UNet2DModel of about the same size, on this CPU.

Run as ``python -m diffgen.bench [--weights PATH] [--batch-size 64] [--steps 50] [--repeats 3]
[--json]``. It reports parameters, FLOPs per image per model evaluation, training throughput,
DDIM sampling throughput in fp32 and bf16 for both models, their ratios, and the matmul peak of
this machine. diffusers (the optional ``bench`` extra) is imported here only, and lazily; when
it is missing the diffusers half is skipped.

Every timing is the median of ``--repeats`` runs after a warm-up, and the diffgen and diffusers
sampling runs are interleaved so background load affects both alike. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffgen.data import packaged_mnist
from diffgen.device import Precision
from diffgen.diffusion import ScheduleConfig
from diffgen.errors import DiffgenError
from diffgen.pipeline import LoadedModel, default_weights, generate, load, load_classifier
from diffgen.sampling import NO_GUIDANCE, Guidance, SamplerConfig
from diffgen.training import TrainConfig, Trainer
from diffgen.unet import UNetConfig, count_parameters

T = TypeVar("T")
DIFFUSERS_MISSING = ("note: diffusers is not installed (pip install 'diffgen[bench]'); "
                     "skipping the diffusers comparison")
MATMUL_SIZE = 2048
MATMULS_PER_RUN = 4
WARMUP_SAMPLE_STEPS = 2  # a warm-up run only needs the shapes, not the full chain
TRAIN_WARMUP_STEPS = 2


# ----------------------------------------------------------------------------- pure helpers

def flops_per_call(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def closest(candidates: Iterable[T], count: Callable[[T], int], target: int) -> tuple[T, int]:
    """The candidate whose ``count`` is nearest ``target`` (the first on a tie), and its count."""
    best: tuple[T, int] | None = None
    for candidate in candidates:
        n = count(candidate)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (candidate, n)
    if best is None:
        raise DiffgenError("no candidate configurations to choose from")
    return best


def relative_difference(value: float, reference: float) -> float:
    """(value - reference) / reference."""
    return (value - reference) / reference


def diffusers_kwargs(config: UNetConfig, channels: tuple[int, ...], layers: int) -> dict:
    """UNet2DModel arguments mirroring diffgen's layout: its levels, groups, heads and classes.

    ``channels`` are the widths of the levels; attention sits only at the lowest level (and in
    the middle block), with as many heads as diffgen uses.
    """
    levels = len(channels)
    return {
        "sample_size": config.image_size[0],
        "in_channels": config.in_channels,
        "out_channels": config.in_channels,
        "block_out_channels": tuple(channels),
        "layers_per_block": layers,
        "down_block_types": ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        "norm_num_groups": config.num_groups,
        "attention_head_dim": channels[-1] // config.num_heads,
        "num_class_embeds": config.num_classes + 1,
    }


def valid_channels(config: UNetConfig, channels: tuple[int, ...]) -> bool:
    """Positive widths the group count divides, with the lowest level split evenly into heads."""
    return (all(c > 0 and c % config.num_groups == 0 for c in channels)
            and channels[-1] % config.num_heads == 0)


def search_diffusers_config(config: UNetConfig, count: Callable[[dict], int], target: int,
                            layers: Iterable[int] = (1, 2, 3)) -> tuple[dict, int]:
    """The UNet2DModel arguments whose parameter count ``count`` gives nearest ``target``.

    For each ``layers_per_block``, first the base width (in steps of the group count, up to 4x
    diffgen's) with diffgen's channel multipliers, then a hill climb that moves one level's
    width by one group step at a time while that brings the count nearer the target.
    """
    step = config.num_groups
    counts: dict[tuple, int] = {}

    def counted(key: tuple[int, tuple[int, ...]]) -> int:
        if key not in counts:
            counts[key] = count(diffusers_kwargs(config, key[1], key[0]))
        return counts[key]

    best: tuple[tuple[int, tuple[int, ...]], int] | None = None
    for n in layers:
        bases = range(step, 4 * config.base_channels + 1, step)
        grid = [(n, chans) for chans in (tuple(b * m for m in config.channel_mult)
                                         for b in bases) if valid_channels(config, chans)]
        key, value = closest(grid, counted, target)
        while True:
            moves = [(n, key[1][:i] + (c + d,) + key[1][i + 1:])
                     for i, c in enumerate(key[1]) for d in (-step, step)]
            moves = [m for m in moves if valid_channels(config, m[1])]
            move, moved = closest(moves, counted, target) if moves else (key, value)
            if abs(moved - target) >= abs(value - target):
                break
            key, value = move, moved
        if best is None or abs(value - target) < abs(best[1] - target):
            best = (key, value)
    if best is None:
        raise DiffgenError("no diffusers configuration to choose from")
    return diffusers_kwargs(config, best[0][1], best[0][0]), best[1]


def peak_share(flops_per_eval: int, steps: int, images_per_s: float, peak_flops: float
               ) -> float:
    """Fraction of a FLOP/s peak that a sampler reaches: FLOPs/image/eval * steps * img/s."""
    return flops_per_eval * steps * images_per_s / peak_flops


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's name where that is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_diffusers() -> ModuleType | None:
    """The diffusers module, or None when it is not installed."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def count_diffusers_parameters(diffusers: ModuleType, kwargs: dict) -> int:
    """Parameters of a UNet2DModel, built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        return count_parameters(diffusers.UNet2DModel(**kwargs))


# ----------------------------------------------------------------------------- measurements

def matmul_gflops(dtype: torch.dtype, repeats: int, size: int = MATMUL_SIZE) -> float:
    """GFLOP/s of ``torch.mm`` on two size x size matrices of ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)

    def run() -> None:
        for _ in range(MATMULS_PER_RUN):
            torch.mm(a, b)

    run()
    seconds = median_time(run, repeats)
    return 2 * size ** 3 * MATMULS_PER_RUN / seconds / 1e9


def train_images_per_s(config: UNetConfig, schedule: ScheduleConfig, batch_size: int, steps: int,
                       repeats: int) -> float:
    """Images/s of diffgen's Trainer at ``batch_size`` in bf16 autocast (``steps`` per run)."""
    data = packaged_mnist()
    train_config = TrainConfig(batch_size=batch_size, steps=10 ** 9)
    with tempfile.TemporaryDirectory(prefix="diffgen-bench-") as out_dir:
        trainer = Trainer(config, schedule, train_config, data, Path(out_dir),
                          torch.device("cpu"), Precision("bf16"))

        def run(n: int) -> None:
            for _ in range(n):
                trainer.train_step()
                trainer.step += 1

        run(TRAIN_WARMUP_STEPS)
        seconds = median_time(lambda: run(steps), repeats)
    return batch_size * steps / seconds


def diffgen_sampler(loaded: LoadedModel, batch_size: int, precision_name: str,
                    guidance: Guidance = NO_GUIDANCE) -> Callable[[int], None]:
    """A function that draws one batch with diffgen's DDIM sampler in ``steps`` steps."""
    labels = [i % loaded.num_classes for i in range(batch_size)]
    seeds = list(range(batch_size))
    precision = Precision(precision_name)

    def run(steps: int) -> None:
        generate(loaded, labels, seeds, SamplerConfig(method="ddim", steps=steps),
                 torch.device("cpu"), precision, batch_size=batch_size, guidance=guidance)

    return run


def diffusers_sampler(diffusers: ModuleType, unet: torch.nn.Module, config: UNetConfig,
                      batch_size: int, bf16: bool) -> Callable[[int], None]:
    """A function that draws one batch with a plain diffusers DDIM loop in ``steps`` steps."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    shape = (batch_size, config.in_channels, *config.image_size)
    labels = torch.arange(batch_size) % config.num_classes

    def run(steps: int) -> None:
        scheduler.set_timesteps(steps)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for t in scheduler.timesteps:
                eps = unet(x, t, class_labels=labels).sample
                x = scheduler.step(eps, t, x).prev_sample

    return run


def sample_images_per_s(runners: dict[str, Callable[[int], None]], batch_size: int, steps: int,
                        repeats: int) -> dict[str, float]:
    """Images/s of each runner: one short warm-up each, then ``repeats`` rounds interleaved."""
    for name, run in runners.items():
        log(f"warm-up {name}")
        run(min(steps, WARMUP_SAMPLE_STEPS))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(repeats):
        for name, run in runners.items():
            tic = time.perf_counter()
            run(steps)
            times[name].append(time.perf_counter() - tic)
            log(f"run {r + 1}/{repeats} {name}: {times[name][-1]:.2f} s")
    return {name: batch_size / statistics.median(ts) for name, ts in times.items()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the report

def benchmark(args: argparse.Namespace) -> dict:
    """Run every measurement and return the figures as one dict."""
    device = torch.device("cpu")
    loaded = load(Path(args.weights) if args.weights else default_weights(), device)
    model, config = loaded.model, loaded.config
    image_shape = (1, config.in_channels, *config.image_size)
    one_t, one_y = torch.tensor([500]), torch.tensor([0])
    x_one = torch.randn(image_shape)

    report: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
        "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
        "train_batch_size": args.train_batch_size, "train_steps": args.train_steps,
        "weights": str(loaded.path),
    }
    with torch.inference_mode():
        dg_flops = flops_per_call(lambda: model(x_one, one_t, one_y))
    report["diffgen"] = {"config": config.to_dict(), "parameters": count_parameters(model),
                         "flops_per_image_eval": dg_flops}

    diffusers = load_diffusers()
    runners = {"diffgen_fp32": diffgen_sampler(loaded, args.batch_size, "fp32")}
    if diffusers is None:
        log(DIFFUSERS_MISSING)
        report["diffusers"] = None
    else:
        log("searching a diffusers config of about the same size")
        kwargs, df_params = search_diffusers_config(
            config, lambda kw: count_diffusers_parameters(diffusers, kw),
            report["diffgen"]["parameters"])
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(**kwargs).eval()
        with torch.inference_mode():
            df_flops = flops_per_call(lambda: unet(x_one, one_t[0], class_labels=one_y))
        report["diffusers"] = {
            "version": diffusers.__version__, "config": kwargs, "parameters": df_params,
            "parameters_vs_diffgen": relative_difference(df_params,
                                                         report["diffgen"]["parameters"]),
            "flops_per_image_eval": df_flops}
        runners["diffusers_fp32"] = diffusers_sampler(diffusers, unet, config,
                                                      args.batch_size, bf16=False)
    runners["diffgen_bf16"] = diffgen_sampler(loaded, args.batch_size, "bf16")
    if diffusers is not None:
        runners["diffusers_bf16"] = diffusers_sampler(diffusers, unet, config,
                                                      args.batch_size, bf16=True)

    log("matmul peaks")
    peaks = {"fp32": matmul_gflops(torch.float32, args.repeats),
             "bf16": matmul_gflops(torch.bfloat16, args.repeats)}
    report["matmul_gflops"] = peaks

    log(f"training: {TRAIN_WARMUP_STEPS} warm-up + {args.train_steps} timed steps per run")
    report["diffgen"]["train_images_per_s_bf16"] = train_images_per_s(
        config, loaded.diffusion.config, args.train_batch_size, args.train_steps, args.repeats)

    speeds = sample_images_per_s(runners, args.batch_size, args.steps, args.repeats)
    for name, value in speeds.items():
        lib, precision = name.split("_")
        report[lib][f"sample_images_per_s_{precision}"] = value
    report["guidance"] = guidance_cost(loaded, args)
    dg = report["diffgen"]
    dg["bf16_peak_share"] = peak_share(dg_flops, args.steps, dg["sample_images_per_s_bf16"],
                                       peaks["bf16"] * 1e9)
    if diffusers is not None:
        df = report["diffusers"]
        report["ratio_diffgen_over_diffusers"] = {
            p: dg[f"sample_images_per_s_{p}"] / df[f"sample_images_per_s_{p}"]
            for p in ("fp32", "bf16")}
        best = (max(dg["sample_images_per_s_fp32"], dg["sample_images_per_s_bf16"])
                / max(df["sample_images_per_s_fp32"], df["sample_images_per_s_bf16"]))
        report["ratio_diffgen_over_diffusers"]["best"] = best
    return report


def guidance_cost(loaded: LoadedModel, args: argparse.Namespace) -> dict | None:
    """bf16 DDIM img/s with each kind of guidance, timed interleaved with unguided sampling.

    Classifier guidance adds one classifier forward and backward per step; classifier-free
    guidance doubles the U-Net batch. None when the shipped classifier is missing.
    """
    try:
        classifier = load_classifier(args.classifier, loaded, torch.device("cpu"))
    except DiffgenError as err:
        log(f"no guidance figures: {err}")
        return None
    x = torch.randn(1, loaded.config.in_channels, *loaded.config.image_size)

    def forward_backward() -> None:  # as log_prob_grad, with backward() for the FLOP counter
        x_t = x.clone().requires_grad_(True)
        torch.log_softmax(classifier(x_t, torch.tensor([500])), dim=-1)[0, 0].backward()

    classifier_flops = flops_per_call(forward_backward)
    runners = {
        "unguided": diffgen_sampler(loaded, args.batch_size, "bf16"),
        "classifier": diffgen_sampler(loaded, args.batch_size, "bf16", Guidance(classifier, 1.0)),
        "cfg": diffgen_sampler(loaded, args.batch_size, "bf16", Guidance(cfg_scale=2.0)),
        "both": diffgen_sampler(loaded, args.batch_size, "bf16",
                                Guidance(classifier, 1.0, cfg_scale=2.0)),
    }
    log("guidance: unguided, classifier, classifier-free and both, bf16")
    speeds = sample_images_per_s(runners, args.batch_size, args.steps, args.repeats)
    return {"classifier_parameters": count_parameters(classifier),
            "classifier_forward_backward_flops": classifier_flops,
            "images_per_s_bf16": speeds,
            "time_vs_unguided": {k: speeds["unguided"] / v for k, v in speeds.items()}}


def format_report(report: dict) -> str:
    """The report as a plain-text table."""
    dg, df = report["diffgen"], report["diffusers"]
    c = dg["config"]
    lines = [
        f"torch {report['torch']}, {report['threads']} threads, CPU: {report['cpu']}",
        f"weights: {report['weights']}",
        f"sampling: DDIM-{report['steps']}, batch {report['batch_size']}; "
        f"median of {report['repeats']} runs",
        "",
        f"matmul {MATMUL_SIZE}x{MATMUL_SIZE}: fp32 {report['matmul_gflops']['fp32']:.1f} "
        f"GFLOP/s, bf16 {report['matmul_gflops']['bf16']:.1f} GFLOP/s",
        "",
        "diffgen config: channels {}, num_res_blocks {}, attention at {}, groups {}, heads {}"
        .format([c["base_channels"] * m for m in c["channel_mult"]], c["num_res_blocks"],
                list(c["attention_resolutions"]), c["num_groups"], c["num_heads"]),
    ]
    if df is not None:
        cfg = df["config"]
        lines.append(f"diffusers {df['version']} config: block_out_channels "
                     f"{list(cfg['block_out_channels'])}, layers_per_block "
                     f"{cfg['layers_per_block']}, norm_num_groups {cfg['norm_num_groups']},")
        lines.append(f"    attention_head_dim {cfg['attention_head_dim']} (attention at the "
                     f"lowest level), num_class_embeds {cfg['num_class_embeds']}")
    lines.append("")
    rows = [("", "diffgen", "diffusers", "ratio")]
    ratio = report.get("ratio_diffgen_over_diffusers", {})

    def row(label: str, key: str, show: Callable[[float], str], ratio_key: str = "") -> None:
        other = show(df[key]) if df is not None else "-"
        r = f"{ratio[ratio_key]:.2f}" if ratio_key in ratio else ""
        rows.append((label, show(dg[key]), other, r))

    row("parameters", "parameters", lambda v: f"{v:,}")
    row("MFLOPs / image / eval", "flops_per_image_eval", lambda v: f"{v / 1e6:,.1f}")
    row("sample img/s fp32", "sample_images_per_s_fp32", lambda v: f"{v:.2f}", "fp32")
    row("sample img/s bf16", "sample_images_per_s_bf16", lambda v: f"{v:.2f}", "bf16")
    if ratio:
        rows.append(("best of each (ratio)", "", "", f"{ratio['best']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                          zip(r[1:], widths[1:])]).rstrip())
    lines.append("")
    if df is not None:
        lines.append(f"diffusers parameters vs diffgen: {df['parameters_vs_diffgen']:+.2%}")
    lines.append(f"diffgen training (batch {report['train_batch_size']}, bf16 autocast): "
                 f"{dg['train_images_per_s_bf16']:.1f} img/s")
    lines.append(f"diffgen bf16 sampler reaches {dg['bf16_peak_share']:.1%} of the bf16 matmul "
                 "peak")
    if ratio:
        lines.append("ratio = diffgen img/s / diffusers img/s (above 1: diffgen is faster)")
    guidance = report.get("guidance")
    if guidance:
        lines.append("")
        lines.append(f"guidance, bf16 DDIM-{report['steps']} (classifier: "
                     f"{guidance['classifier_parameters']:,} parameters, "
                     f"{guidance['classifier_forward_backward_flops'] / 1e6:,.1f} MFLOPs/image "
                     "forward + backward)")
        for name, label in (("unguided", "unguided"), ("classifier", "classifier guidance"),
                            ("cfg", "classifier-free guidance"), ("both", "both")):
            lines.append(f"  {label:<26}{guidance['images_per_s_bf16'][name]:8.2f} img/s  "
                         f"{guidance['time_vs_unguided'][name]:.2f}x the time")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diffgen.bench", description=__doc__
                                     .split("\n", 1)[0])
    parser.add_argument("--weights", help="diffgen model file (default: the shipped model)")
    parser.add_argument("--batch-size", type=int, default=64, help="sampling batch size")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per sampling run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps per training run")
    parser.add_argument("--classifier", help="noisy classifier for the guidance figures "
                                             "(default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "train_batch_size", "train_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = benchmark(args)
    except DiffgenError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
