"""The Gaussian diffusion process of Ho et al. (2020): schedules, q(x_t | x_0), the posterior.

Every schedule array is computed once in float64 and named for the quantity it holds, in DDPM
notation: ``alphas_cumprod[t]`` is ᾱ_t, with t in 0..T-1 (0-based; the paper's t = 1 is our 0).
Tensors handed out are gathered per sample by :func:`extract` and broadcast to the image shape.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from diffgen.errors import InvalidSetting

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    """How the forward chain adds noise."""

    schedule: str = "linear"  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal 2021)
    num_timesteps: int = 1000  # T, the length of the forward chain

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InvalidSetting(
                f"schedule {self.schedule!r} is not known; choose one of {', '.join(SCHEDULES)}"
            )
        if not 2 <= self.num_timesteps <= 100_000:
            raise InvalidSetting(f"T must be in [2, 100000], got {self.num_timesteps}")

    def to_dict(self) -> dict:
        return asdict(self)


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM section 4: betas linear from 1e-4 to 0.02 at T = 1000, scaled by 1000 / T."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM eq. 17: ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2), betas clipped at 0.999.

    Betas are derived first, so ᾱ_0 = 1 - β_0 is strictly below 1.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def extract(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gather ``values[t]`` for a batch of timesteps t [B] as float32, shaped [B, 1, 1, ...]."""
    out = values.to(t.device)[t].float()
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


class GaussianDiffusion:
    """The forward chain q and the quantities the reverse samplers need.

    Attributes are float64 tensors of shape [T]; every coefficient is finite at every t.
    """

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        if config.schedule == "linear":
            betas = linear_betas(config.num_timesteps)
        else:
            betas = cosine_betas(config.num_timesteps)
        self.set_betas(betas)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, config: ScheduleConfig) -> "GaussianDiffusion":
        """A chain with explicit betas, e.g. respaced to a subset of ``config``'s timesteps."""
        chain = cls.__new__(cls)
        chain.config = config
        chain.set_betas(betas.to(torch.float64))
        return chain

    def set_betas(self, betas: torch.Tensor) -> None:
        """Derive every array from betas [T]."""
        self.num_timesteps = betas.shape[0]
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # DDPM eq. 7: β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t, zero at t = 0.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # β̃_0 = 0, so the log is clipped to β̃_1 to stay finite (to β_0 on a one-step chain,
        # whose only step adds no noise).
        first = self.posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([first, self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = (
            betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (DDPM eq. 4): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) eps.

        x_0, eps: [B, C, H, W]; t: int64 [B].
        """
        return (extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * eps)

    def q_posterior(self, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def predict_x_0(self, x_t: torch.Tensor, t: torch.Tensor, eps_pred: torch.Tensor
                    ) -> torch.Tensor:
        """x̂_0 from ε_θ, inverting eq. 4: x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε_θ) / sqrt(ᾱ_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps_pred)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x_0_pred: torch.Tensor
                    ) -> torch.Tensor:
        """The eps consistent with x_t and a (possibly clipped) x̂_0, again from eq. 4."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_0_pred)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))
