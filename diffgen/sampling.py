"""Reverse samplers: DDPM ancestral sampling and DDIM, on any decreasing list of timesteps.

Both share one loop and one per-step callback that receives a dict with ``i``, ``t``, ``x_t``
and ``x_0_pred``. A step goes from timestep ``t`` to ``t_prev``, the next entry of the list, or
to -1 after the last one, where ᾱ_{-1} = 1 so the final step lands on x̂_0.

Notation: the DDIM paper's α_t is our ᾱ_t (``alphas_cumprod``).

Guidance (Dhariwal & Nichol 2021; Ho & Salimans 2022) enters through :class:`Guidance`:

* classifier guidance with scale s: DDPM shifts the mean by s Σ ∇ log p_φ(y | x_t) (Σ the
  variance of the step), DDIM shifts ε by -sqrt(1 - ᾱ_t) s ∇ log p_φ(y | x_t); both after x̂_0
  is clipped, so the shift is exactly what the formula says;
* classifier-free guidance with scale W: ε = ε(x_t, ∅) + W (ε(x_t, y) - ε(x_t, ∅)), W = 1
  being plain conditional sampling; the paper's (1 + w) ε(x_t, y) - w ε(x_t, ∅) is W = 1 + w.
  Both passes run as one batch of 2B.

Randomness is per sample: sample ``i`` draws its starting noise and every later ``noise`` from
its own CPU generator seeded by ``seeds[i]``, so its image depends neither on the batch it was
drawn in nor on the device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffgen.classifier import log_prob_grad
from diffgen.device import Precision, autocast
from diffgen.diffusion import GaussianDiffusion, extract
from diffgen.errors import DiffgenError, InvalidSetting

log = logging.getLogger(__name__)

Callback = Callable[[dict], None]
METHODS = ("ddim", "ddpm")
VARIANCES = ("small", "large")


@dataclass(frozen=True)
class SamplerConfig:
    """Which reverse process to run and how."""

    method: str = "ddim"  # "ddim" (Song et al. 2021) or "ddpm" (Ho et al. 2020, algorithm 2)
    steps: int = 50  # model evaluations; at most T
    eta: float = 0.0  # DDIM only: 0 is deterministic, 1 matches DDPM's posterior variance
    variance: str = "small"  # DDPM only: "small" is β̃_t, "large" is β_t
    clip_denoised: bool = True  # clip x̂_0 to [-1, 1] before each step

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidSetting(f"sampler {self.method!r} is not known; use ddim or ddpm")
        if self.steps < 1:
            raise InvalidSetting(f"--steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0 or not math.isfinite(self.eta):
            raise InvalidSetting(f"--eta must be in [0, 1], got {self.eta}")
        if self.method == "ddpm" and self.eta != 0.0:
            raise InvalidSetting("--eta applies to DDIM only; DDPM's variance is set by "
                               "--variance")
        if self.variance not in VARIANCES:
            raise InvalidSetting(f"variance {self.variance!r} is not known; use small or large")
        if self.method == "ddim" and self.variance != "small":
            raise InvalidSetting("--variance applies to DDPM only; DDIM's noise is set by --eta")

    def check(self, num_timesteps: int) -> None:
        if self.steps > num_timesteps:
            raise InvalidSetting(f"--steps {self.steps} exceeds the model's T = {num_timesteps}")


# Far beyond any useful scale (1-10) and far below float32 overflow in s * Σ * grad.
MAX_CLASSIFIER_SCALE = 1000.0
MAX_CFG_SCALE = 100.0


@dataclass
class Guidance:
    """How sampling is steered; the defaults steer nothing (plain conditional sampling)."""

    classifier: torch.nn.Module | None = None  # the noisy classifier p_φ(y | x_t, t)
    classifier_scale: float = 0.0  # s; 0 is no classifier guidance
    cfg_scale: float = 1.0  # W; 1 is plain conditional sampling, 0 unconditional
    unconditional: bool = False  # run ε_θ on the null class (the labels only steer s)

    def __post_init__(self) -> None:
        self.check(self.classifier_scale, self.cfg_scale, self.unconditional)
        if self.classifier_scale and self.classifier is None:
            raise InvalidSetting("--classifier-scale needs a classifier")

    @staticmethod
    def check(classifier_scale: float, cfg_scale: float, unconditional: bool) -> None:
        """Refuse settings that cannot work, before any model is loaded."""
        for name, value, most in (("--classifier-scale", classifier_scale, MAX_CLASSIFIER_SCALE),
                                  ("--cfg-scale", cfg_scale, MAX_CFG_SCALE)):
            if not math.isfinite(value) or not 0 <= value <= most:
                raise InvalidSetting(f"{name} must be a number in [0, {most:g}], got {value:g}")
        if unconditional and cfg_scale != 1.0:
            raise InvalidSetting("--cfg-scale mixes conditional and unconditional passes; it "
                                 "cannot be used with --unconditional")

    @property
    def uses_classifier(self) -> bool:
        return self.classifier_scale != 0.0

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0 and not self.unconditional


NO_GUIDANCE = Guidance()


def guided_eps(model: torch.nn.Module, x_t: torch.Tensor, t_batch: torch.Tensor,
               labels: torch.Tensor, guidance: Guidance, precision: Precision) -> torch.Tensor:
    """ε for one step: conditional, unconditional, or their classifier-free mix (float32)."""
    null = torch.full_like(labels, model.config.num_classes)
    with autocast(x_t.device, precision):
        if guidance.uses_cfg:
            both = model(torch.cat([x_t, x_t]), torch.cat([t_batch, t_batch]),
                         torch.cat([labels, null])).float()
            eps_cond, eps_uncond = both.chunk(2)
            return eps_uncond + guidance.cfg_scale * (eps_cond - eps_uncond)
        return model(x_t, t_batch, null if guidance.unconditional else labels).float()


def timesteps_for(steps: int, start: int) -> list[int]:
    """``steps`` timesteps from ``start`` down to 0, evenly spaced, strictly decreasing.

    The first is always ``start`` (T - 1 for sampling from noise) and, for steps >= 2, the
    last is 0; e.g. 50 steps from 999 give 999, 979, 958, ..., 20, 0.
    """
    if not 1 <= steps <= start + 1:
        raise InvalidSetting(f"cannot take {steps} steps from t = {start} (at most {start + 1})")
    values = torch.linspace(start, 0, steps, dtype=torch.float64).round().long().tolist()
    assert all(a > b for a, b in zip(values, values[1:])), values
    return values


def respace(diffusion: GaussianDiffusion, timesteps: list[int]) -> GaussianDiffusion:
    """The chain on a subset S of timesteps: β'_i = 1 - ᾱ_{s_i} / ᾱ_{s_{i-1}} (ᾱ before s_0 = 1).

    Improved DDPM section 4; with S = 0..T-1 it is the original chain.
    """
    ascending = sorted(timesteps)
    alphas_cumprod = diffusion.alphas_cumprod[ascending]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return GaussianDiffusion.from_betas(1.0 - alphas_cumprod / previous, diffusion.config)


def ddim_sigma(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float
               ) -> torch.Tensor:
    """DDIM eq. 16: σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
                  ).sqrt()


def ddim_step(diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int, t_prev: int,
              eps_pred: torch.Tensor, eta: float, clip_denoised: bool,
              noise: torch.Tensor | None, score: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step, eq. 12; returns (x_prev, x̂_0).

    x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε_θ + σ_t noise, where ᾱ_prev = 1
    for t_prev = -1. When x̂_0 is clipped, ε_θ is recomputed from it so both stay consistent
    with x_t. ``score`` (s ∇ log p(y | x_t)) shifts ε_θ by -sqrt(1 - ᾱ_t) score, and x̂_0
    follows the shifted ε.
    """
    batch = x_t.shape[0]
    t_batch = torch.full((batch,), t, dtype=torch.long, device=x_t.device)

    # 1. x̂_0 from ε_θ, clipped, and the ε consistent with it
    x_0_pred = diffusion.predict_x_0(x_t, t_batch, eps_pred)
    if clip_denoised:
        x_0_pred = x_0_pred.clamp(-1, 1)
        eps_pred = diffusion.predict_eps(x_t, t_batch, x_0_pred)
    if score is not None:
        eps_pred = eps_pred - extract(diffusion.sqrt_one_minus_alphas_cumprod, t_batch,
                                      x_t.shape) * score
        x_0_pred = diffusion.predict_x_0(x_t, t_batch, eps_pred)

    # 2. ᾱ_t, ᾱ_prev and σ_t(η) in float64, then the update of eq. 12
    alpha_bar_t = diffusion.alphas_cumprod[t]
    alpha_bar_prev = (diffusion.alphas_cumprod[t_prev] if t_prev >= 0
                      else torch.tensor(1.0, dtype=torch.float64))
    sigma_t = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    direction = (1 - alpha_bar_prev - sigma_t ** 2).clamp(min=0).sqrt()
    x_prev = alpha_bar_prev.sqrt().float() * x_0_pred + direction.float() * eps_pred
    if eta > 0 and t_prev >= 0:
        x_prev = x_prev + sigma_t.float() * noise
    return x_prev, x_0_pred


def ddpm_step(chain: GaussianDiffusion, x_t: torch.Tensor, i: int, eps_pred: torch.Tensor,
              variance: str, clip_denoised: bool, noise: torch.Tensor | None,
              score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step on a (respaced) chain at index i; returns (x_prev, x̂_0).

    x_prev ~ N(μ̃(x_t, x̂_0) + Σ score, Σ) with μ̃ from DDPM eq. 7, Σ = β̃_i ("small") or β_i
    ("large", with β̃_1 in place of β_0 as in Improved DDPM), and ``score`` the classifier's
    s ∇ log p(y | x_t) or None; no noise at i = 0.
    """
    i_batch = torch.full((x_t.shape[0],), i, dtype=torch.long, device=x_t.device)
    x_0_pred = chain.predict_x_0(x_t, i_batch, eps_pred)
    if clip_denoised:
        x_0_pred = x_0_pred.clamp(-1, 1)
    mean, _, log_variance = chain.q_posterior(x_0_pred, x_t, i_batch)
    if variance == "large":
        large = torch.cat([chain.posterior_log_variance_clipped[:1], chain.betas[1:].log()])
        log_variance = extract(large, i_batch, x_t.shape)
    if score is not None:
        mean = mean + log_variance.exp() * score
    if i == 0:
        return mean, x_0_pred
    return mean + (0.5 * log_variance).exp() * noise, x_0_pred


class SeededNoise:
    """One CPU generator per sample; draws [B, C, H, W] with row b from generator b."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = shape

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


def denoise_loop(model: torch.nn.Module, diffusion: GaussianDiffusion, x_t: torch.Tensor,
                 labels: torch.Tensor, timesteps: list[int], config: SamplerConfig,
                 noise: SeededNoise, precision: Precision, callback: Callback | None = None,
                 guidance: Guidance = NO_GUIDANCE) -> torch.Tensor:
    """Run the reverse chain from x_t at timesteps[0] to x_0; returns x_0 [B, C, H, W].

    ``labels`` are the classes asked for; with ``guidance.unconditional`` ε_θ sees the null
    class instead and only the classifier steers towards them. The classifier sees the same
    x_t and original timestep t as the U-Net, also on a respaced DDPM chain.
    """
    log.debug("%s on %d timesteps: %s", config.method, len(timesteps), timesteps)
    chain = respace(diffusion, timesteps) if config.method == "ddpm" else None
    needs_noise = config.method == "ddpm" or config.eta > 0
    # Autograd is needed for the classifier's gradient only; inference mode is faster.
    with torch.no_grad() if guidance.uses_classifier else torch.inference_mode():
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
            eps_pred = guided_eps(model, x_t, t_batch, labels, guidance, precision)
            score = None
            if guidance.uses_classifier:
                score = guidance.classifier_scale * log_prob_grad(
                    guidance.classifier, x_t, t_batch, labels, precision)
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            step_noise = noise.draw().to(x_t.device) if needs_noise and t_prev >= 0 else None
            if config.method == "ddim":
                x_t, x_0_pred = ddim_step(diffusion, x_t, t, t_prev, eps_pred, config.eta,
                                          config.clip_denoised, step_noise, score)
            else:
                x_t, x_0_pred = ddpm_step(chain, x_t, len(timesteps) - 1 - i, eps_pred,
                                          config.variance, config.clip_denoised, step_noise,
                                          score)
            if callback is not None:
                callback({"i": i, "t": t, "x_t": x_t, "x_0_pred": x_0_pred})
    return x_t


def sample(model: torch.nn.Module, diffusion: GaussianDiffusion, labels: list[int],
           seeds: list[int], config: SamplerConfig, device: torch.device, precision: Precision,
           batch_size: int = 64, callback: Callback | None = None,
           x_0: torch.Tensor | None = None, start: int | None = None,
           guidance: Guidance = NO_GUIDANCE) -> torch.Tensor:
    """Draw one image per (label, seed) pair, in batches of at most ``batch_size``.

    From pure noise by default; with ``x_0`` [N, C, H, W] and ``start`` t_0 (SDEdit), each
    x_0 is first noised to q(x_{t_0} | x_0). The callback sees one batch at a time, with
    ``batch`` (its index) added. Returns images in [-1, 1], float32 [N, C, H, W] on the CPU.
    """
    if len(labels) != len(seeds):
        raise DiffgenError("one seed is needed per sample")
    if batch_size < 1:
        raise InvalidSetting(f"--batch-size must be at least 1, got {batch_size}")
    config.check(diffusion.num_timesteps)
    start = diffusion.num_timesteps - 1 if start is None else start
    timesteps = timesteps_for(min(config.steps, start + 1), start)
    shape = (model.config.in_channels, *model.config.image_size)
    model.eval()
    if guidance.classifier is not None:
        guidance.classifier.eval()
    null = getattr(model.config, "num_classes", 0)
    if guidance.uses_classifier and any(k == null for k in labels):
        raise InvalidSetting("classifier guidance needs a class to steer towards; give --class")
    if guidance.uses_cfg and any(k == null for k in labels):
        raise InvalidSetting("--cfg-scale needs a class to steer towards; give --class")
    outputs = []
    for batch, begin in enumerate(range(0, len(seeds), batch_size)):
        end = min(begin + batch_size, len(seeds))
        noise = SeededNoise(seeds[begin:end], shape)
        eps = noise.draw()
        if x_0 is None:
            x_t = eps
        else:
            t_batch = torch.full((end - begin,), start, dtype=torch.long)
            x_t = diffusion.q_sample(x_0[begin:end].float(), t_batch, eps)
        batch_labels = torch.tensor(labels[begin:end], dtype=torch.long, device=device)

        def batch_callback(state: dict, batch: int = batch) -> None:
            callback({**state, "batch": batch})

        outputs.append(denoise_loop(model, diffusion, x_t.to(device), batch_labels, timesteps,
                                    config, noise, precision,
                                    batch_callback if callback else None, guidance).cpu())
    result = torch.cat(outputs)
    if not torch.isfinite(result).all():
        raise DiffgenError("sampling produced non-finite values; the guidance scale is too "
                           "large or the model is broken")
    return result
