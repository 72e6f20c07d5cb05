"""What the commands do, over the engine: load a model, sample, draw trajectories, denoise.

Each function takes resolved settings and returns tensors; files are written by the caller.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen import checkpoint
from diffgen.classifier import ClassifierConfig, NoisyClassifier
from diffgen.device import Precision
from diffgen.diffusion import GaussianDiffusion, ScheduleConfig
from diffgen.errors import DiffgenError, InvalidSetting
from diffgen.sampling import (NO_GUIDANCE, Guidance, SamplerConfig, SeededNoise, sample,
                              timesteps_for)
from diffgen.shipped import shipped_file
from diffgen.unet import UNet, UNetConfig, count_parameters

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "model.safetensors"
DEFAULT_CLASSIFIER = "classifier.safetensors"


@dataclass
class LoadedModel:
    """A network ready to sample, with its forward chain and where it came from."""

    model: UNet
    diffusion: GaussianDiffusion
    path: Path
    step: int
    train_config: dict

    @property
    def config(self) -> UNetConfig:
        return self.model.config

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes


def default_weights() -> Path:
    """The MNIST model shipped with diffgen."""
    return shipped_file(DEFAULT_WEIGHTS)


HUB_PREFIX = "hf://"


def fetch_from_hub(spec: str) -> Path:
    """``hf://owner/repo/file.safetensors[@revision]`` -> a local copy from the Hugging Face Hub.

    Downloaded once into the Hub's cache; with ``HF_HUB_OFFLINE=1`` only the cache is used.
    """
    body, _, revision = spec[len(HUB_PREFIX):].partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise InvalidSetting(f"--weights {spec!r} is not of the form "
                             "hf://owner/repo/file.safetensors[@revision]")
    from huggingface_hub import hf_hub_download

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # the one-line error says it
    try:
        local = hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]),
                                revision=revision or None)
    except Exception as err:  # the hub client raises many types; all mean "not available"
        raise DiffgenError(f"cannot fetch {spec}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'no detail'}") from None
    return Path(local)


def read_checkpoint(path: Path | str | None, option: str, default: str, kind: str
                    ) -> tuple[Path, checkpoint.Checkpoint]:
    """Find (local, hub or shipped) and read a model file of ``kind``."""
    if path is None:
        path = shipped_file(default, option)
    elif str(path).startswith(HUB_PREFIX):
        path = fetch_from_hub(str(path))
    path = Path(path)
    if path.is_dir():
        raise DiffgenError(f"{option} {path} is a folder; pass the {checkpoint.MODEL_FILE} in it")
    if path.name == checkpoint.STATE_FILE:
        raise DiffgenError(f"{option} {path} is a training state; pass the "
                           f"{checkpoint.MODEL_FILE} beside it")
    ckpt = checkpoint.load_model(path)
    if ckpt.kind != kind:
        other = "--classifier" if ckpt.kind == checkpoint.KIND_CLASSIFIER else "--weights"
        what = ("a noisy classifier" if ckpt.kind == checkpoint.KIND_CLASSIFIER
                else "a diffusion model")
        raise DiffgenError(f"{option} {path} is {what}; pass it as {other}")
    return path, ckpt


def chosen_weights(ckpt: checkpoint.Checkpoint, path: Path, ema: bool) -> dict:
    weights = ckpt.ema if ema else ckpt.params
    broken = next((name for name, tensor in weights.items()
                   if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if broken is not None:
        raise DiffgenError(f"{path}: tensor {broken!r} holds NaN or infinite values")
    return weights


def load(path: Path | str | None, device: torch.device, ema: bool = True) -> LoadedModel:
    """Rebuild a U-Net from a diffgen model file; EMA weights unless ``ema`` is False.

    ``path`` is a local file, ``hf://owner/repo/file`` on the Hugging Face Hub, or None for
    the shipped model.
    """
    path, ckpt = read_checkpoint(path, "--weights", DEFAULT_WEIGHTS, checkpoint.KIND_UNET)
    config = UNetConfig.from_dict(ckpt.model_config)
    schedule = ScheduleConfig(**ckpt.schedule_config)
    model = UNet(config)
    weights = chosen_weights(ckpt, path, ema)
    checkpoint.load_weights_into(model, weights, f"{path} ({'EMA' if ema else 'raw'} weights)")
    # channels-last convolutions sample about 25% faster on a CPU under bf16 and fp32.
    model.to(device, memory_format=torch.channels_last).eval()
    log.info("loaded %s: step %d, %s parameters, %s weights", path, ckpt.step,
             f"{count_parameters(model):,}", "EMA" if ema else "raw")
    return LoadedModel(model, GaussianDiffusion(schedule), path, ckpt.step, ckpt.train_config)


def load_classifier(path: Path | str | None, loaded: LoadedModel, device: torch.device
                    ) -> NoisyClassifier:
    """The noisy classifier (EMA weights) for guiding ``loaded``; the shipped one for None.

    It must share the model's noise schedule, image shape and classes.
    """
    path, ckpt = read_checkpoint(path, "--classifier", DEFAULT_CLASSIFIER,
                                 checkpoint.KIND_CLASSIFIER)
    config = ClassifierConfig.from_dict(ckpt.model_config)
    if ScheduleConfig(**ckpt.schedule_config) != loaded.diffusion.config:
        raise DiffgenError(f"--classifier {path} was trained on another noise schedule "
                           f"({ckpt.schedule_config}) than {loaded.path}")
    shape = (config.in_channels, *config.image_size)
    if shape != (loaded.config.in_channels, *loaded.config.image_size):
        raise DiffgenError(f"--classifier {path} reads {shape} images, {loaded.path} makes "
                           f"{(loaded.config.in_channels, *loaded.config.image_size)}")
    if config.num_classes != loaded.num_classes:
        raise DiffgenError(f"--classifier {path} has {config.num_classes} classes, "
                           f"{loaded.path} {loaded.num_classes}")
    classifier = NoisyClassifier(config)
    checkpoint.load_weights_into(classifier, chosen_weights(ckpt, path, True),
                                 f"{path} (EMA weights)")
    classifier.to(device).eval()
    log.info("loaded classifier %s: step %d, %s parameters", path, ckpt.step,
             f"{count_parameters(classifier):,}")
    return classifier


def class_labels(loaded: LoadedModel, classes: list[int], n: int) -> list[int]:
    """``n`` labels per requested class (all classes when none are given), grouped by class."""
    if n < 1:
        raise InvalidSetting(f"--n must be at least 1, got {n}")
    num_classes = loaded.num_classes
    for k in classes:
        if not 0 <= k < num_classes:
            raise InvalidSetting(f"--class {k} is out of range; this model has classes "
                               f"0..{num_classes - 1}")
    chosen = classes or list(range(num_classes))
    return [k for k in chosen for _ in range(n)]


def guided_labels(loaded: LoadedModel, classes: list[int], n: int, guidance: Guidance
                  ) -> list[int]:
    """Labels of the samples: n per class, or n of the null class for plain unconditional
    sampling (no class given, no classifier to steer)."""
    if guidance.unconditional and not guidance.uses_classifier:
        if classes:
            raise InvalidSetting("--class with --unconditional needs --classifier-scale to "
                                 "steer towards it")
        if n < 1:
            raise InvalidSetting(f"--n must be at least 1, got {n}")
        return [loaded.model.null_class] * n
    return class_labels(loaded, classes, n)


def seeds_for(seed: int, count: int) -> list[int]:
    """Sample i gets seed + i, so a sample is reproduced alone from its own seed."""
    if not 0 <= seed <= 2 ** 63 - 1 - count:
        raise InvalidSetting(f"--seed must be in [0, 2^63 - 1 - {count}], got {seed}")
    return [seed + i for i in range(count)]


def generate(loaded: LoadedModel, labels: list[int], seeds: list[int], config: SamplerConfig,
             device: torch.device, precision: Precision, batch_size: int,
             callback=None, guidance: Guidance = NO_GUIDANCE) -> torch.Tensor:
    """Samples [N, C, H, W] in [-1, 1] for each (label, seed)."""
    return sample(loaded.model, loaded.diffusion, labels, seeds, config, device, precision,
                  batch_size=batch_size, callback=callback, guidance=guidance)


def frame_indices(num_steps: int, frames: int) -> list[int]:
    """Which of ``num_steps`` steps to show after the starting noise: ``frames`` of them,
    evenly spread and ending with the last (50 steps, 2 frames: steps 24 and 49)."""
    frames = max(1, min(frames, num_steps))
    return sorted({round((k + 1) * num_steps / frames) - 1 for k in range(frames)})


def reverse_trajectory(loaded: LoadedModel, labels: list[int], seeds: list[int],
                       config: SamplerConfig, device: torch.device, precision: Precision,
                       frames: int, guidance: Guidance = NO_GUIDANCE
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """x_t and x̂_0 of every sample at ``frames`` steps of the reverse chain.

    Returns (x_t frames, x̂_0 frames, timesteps), each frame [N, C, H, W]; the first frame is
    the starting noise x_T and the last the final samples.
    """
    config.check(loaded.diffusion.num_timesteps)
    steps = timesteps_for(config.steps, loaded.diffusion.num_timesteps - 1)
    keep = set(frame_indices(len(steps), frames - 1))
    x_t_frames: list[torch.Tensor] = []
    x_0_frames: list[torch.Tensor] = []
    shown: list[int] = []

    def record(state: dict) -> None:
        if state["i"] in keep:
            x_t_frames.append(state["x_t"].float().cpu())
            x_0_frames.append(state["x_0_pred"].float().cpu())
            shown.append(state["t"])

    x_T = sample_start(loaded, seeds)
    final = sample(loaded.model, loaded.diffusion, labels, seeds, config, device, precision,
                   batch_size=len(seeds), callback=record, guidance=guidance)
    x_t_frames[-1] = final
    return [x_T, *x_t_frames], [torch.zeros_like(x_T), *x_0_frames], [steps[0] + 1, *shown]


def sample_start(loaded: LoadedModel, seeds: list[int]) -> torch.Tensor:
    """The starting noise x_T that :func:`sample` draws for these seeds."""
    return SeededNoise(seeds, (loaded.config.in_channels, *loaded.config.image_size)).draw()


def forward_trajectory(diffusion: GaussianDiffusion, x_0: torch.Tensor, seeds: list[int],
                       frames: int) -> tuple[list[torch.Tensor], list[int]]:
    """Real images x_0 [N, C, H, W] noised by q(x_t | x_0) at ``frames`` evenly spaced t.

    One fixed eps per image, so the frames show a single path from x_0 to nearly pure noise.
    """
    eps = SeededNoise(seeds, tuple(x_0.shape[1:])).draw()
    last = diffusion.num_timesteps - 1
    ts = [round((k + 1) * last / (frames - 1)) for k in range(frames - 1)]
    out = [x_0]
    for t in ts:
        out.append(diffusion.q_sample(x_0, torch.full((x_0.shape[0],), t, dtype=torch.long),
                                      eps))
    return out, [-1, *ts]


def strength_to_t(strength: float | None, t: int | None, num_timesteps: int) -> int | None:
    """The SDEdit start step: strength s in [0, 1] maps to t_0 = round(s (T - 1)).

    Returns None for strength 0 (nothing to do: the input is returned as it is).
    """
    if (strength is None) == (t is None):
        raise InvalidSetting("give exactly one of --strength and --t")
    if t is not None:
        if not 0 <= t < num_timesteps:
            raise InvalidSetting(f"--t {t} is out of range; this model has t in "
                               f"0..{num_timesteps - 1}")
        return t
    if not 0.0 <= strength <= 1.0:
        raise InvalidSetting(f"--strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return None
    return round(strength * (num_timesteps - 1))


def denoise(loaded: LoadedModel, x_0: torch.Tensor, labels: list[int], seeds: list[int],
            start: int | None, config: SamplerConfig, device: torch.device,
            precision: Precision, batch_size: int, guidance: Guidance = NO_GUIDANCE
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022): noise each x_0 to t_0, then run the reverse chain back.

    The number of steps scales with t_0 (``steps * (t_0 + 1) / T``, at least one); t_0 = T - 1
    starts from pure noise, not from a faint copy of the input. Returns (noised, denoised).
    """
    if start is None:
        return x_0.clone(), x_0.clone()
    total = loaded.diffusion.num_timesteps
    config.check(total)
    steps = max(1, round(config.steps * (start + 1) / total))
    run = SamplerConfig(config.method, steps, config.eta, config.variance, config.clip_denoised)
    pure_noise = start == total - 1
    noise_start = sample_start(loaded, seeds)
    if pure_noise:
        noised = noise_start
    else:
        t_batch = torch.full((x_0.shape[0],), start, dtype=torch.long)
        noised = loaded.diffusion.q_sample(x_0, t_batch, noise_start)
    out = sample(loaded.model, loaded.diffusion, labels, seeds, run, device, precision,
                 batch_size=batch_size, x_0=None if pure_noise else x_0, start=start,
                 guidance=guidance)
    return noised, out


def evaluate(loaded: LoadedModel, config: SamplerConfig, guidance: Guidance, n: int, seed: int,
             device: torch.device, precision: Precision, batch_size: int,
             judge: torch.nn.Module, callback=None) -> dict:
    """Sample n digits per class (n * 10 unlabelled ones for plain unconditional sampling) and
    rate them with :func:`diffgen.quality.evaluate_with_floor`. The settings and img/s go
    under ``sampling``, apart from the figures (whose ``precision`` is the metric)."""
    from diffgen.judge import NUM_CLASSES
    from diffgen.quality import evaluate_with_floor

    shape = (loaded.config.in_channels, *loaded.config.image_size)
    if shape != (1, 28, 28) or loaded.num_classes != NUM_CLASSES:
        raise DiffgenError(f"{loaded.path} makes {shape[0]}x{shape[1]}x{shape[2]} images in "
                           f"{loaded.num_classes} classes; the judge rates 1x28x28 digits in "
                           f"{NUM_CLASSES}")
    config.check(loaded.diffusion.num_timesteps)
    plain = guidance.unconditional and not guidance.uses_classifier
    labels = guided_labels(loaded, [], n * NUM_CLASSES if plain else n, guidance)
    log.info("sampling %d digits with %s, %d steps", len(labels), config.method, config.steps)
    tic = time.perf_counter()
    samples = generate(loaded, labels, seeds_for(seed, len(labels)), config, device, precision,
                       batch_size, callback, guidance)
    seconds = time.perf_counter() - tic
    settings = dict(weights=str(loaded.path), step=loaded.step, sampler=config.method,
                    steps=config.steps, eta=config.eta, variance=config.variance,
                    classifier_scale=guidance.classifier_scale, cfg_scale=guidance.cfg_scale,
                    unconditional=guidance.unconditional, n_per_class=n, seed=seed,
                    device=str(device), precision=precision.name,
                    sampling_seconds=round(seconds, 2),
                    images_per_s=round(len(samples) / seconds, 2))
    return {"sampling": settings,
            **evaluate_with_floor(samples, None if plain else labels, judge)}
