"""Schedules and the forward chain (CASES S1-S4)."""

import math

import pytest
import torch

from diffgen.diffusion import GaussianDiffusion, ScheduleConfig, cosine_betas, linear_betas
from diffgen.errors import DiffgenError


@pytest.fixture(scope="module")
def linear() -> GaussianDiffusion:
    return GaussianDiffusion(ScheduleConfig("linear", 1000))


@pytest.fixture(scope="module")
def cosine() -> GaussianDiffusion:
    return GaussianDiffusion(ScheduleConfig("cosine", 1000))


def test_linear_reference_values(linear):  # S1
    assert linear.betas.dtype == torch.float64
    assert linear.alphas_cumprod[0].item() == pytest.approx(0.9999, abs=1e-12)
    assert linear.alphas_cumprod[500].item() == pytest.approx(0.0777967, rel=1e-5)
    assert linear.alphas_cumprod[999].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert linear.posterior_variance[0].item() == 0.0
    assert linear.posterior_variance[1].item() == pytest.approx(5.45319e-5, rel=1e-5)
    assert linear.posterior_variance[500].item() == pytest.approx(0.0100513, rel=1e-5)


def test_linear_betas_scale_with_T():
    betas = linear_betas(250)
    assert betas[0].item() == pytest.approx(4e-4)
    assert betas[-1].item() == pytest.approx(0.08)


def test_cosine_at_zero_is_below_one(cosine):  # S2
    assert cosine.betas[0].item() == pytest.approx(4.12842e-5, rel=1e-5)
    assert cosine.alphas_cumprod[0].item() == pytest.approx(0.99995872, abs=1e-8)
    assert cosine.alphas_cumprod[0].item() < 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_coefficient_is_finite(schedule):  # S2, S4, for both schedules
    chain = GaussianDiffusion(ScheduleConfig(schedule, 1000))
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2"):
        assert torch.isfinite(getattr(chain, name)).all(), name


def test_cosine_beta_clipping(cosine):  # S3
    raw = cosine_betas(1000, max_beta=math.inf)
    assert int((raw > 0.999).sum()) == 1
    assert raw[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert cosine.betas.max().item() == pytest.approx(0.999)
    assert cosine.betas[998].item() == pytest.approx(0.7499994, rel=1e-6)
    assert cosine.alphas_cumprod[999].item() == pytest.approx(2.4288e-9, rel=1e-4)


def test_posterior_log_variance_is_clipped_at_zero(linear):  # S4
    assert linear.posterior_log_variance_clipped[0].item() == pytest.approx(-9.81673, abs=1e-5)
    assert linear.posterior_log_variance_clipped[0] == linear.posterior_log_variance_clipped[1]


def test_q_sample_and_x_0_inverse(linear):
    x_0 = torch.rand(4, 1, 5, 5) * 2 - 1
    eps = torch.randn(4, 1, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    x_t = linear.q_sample(x_0, t, eps)
    expected = linear.alphas_cumprod[500].sqrt() * x_0[2] + (1 - linear.alphas_cumprod[500]
                                                              ).sqrt() * eps[2]
    torch.testing.assert_close(x_t[2], expected.float())
    torch.testing.assert_close(linear.predict_x_0(x_t, t, eps), x_0, atol=2e-3, rtol=0)
    torch.testing.assert_close(linear.predict_eps(x_t, t, x_0), eps, atol=1e-3, rtol=0)


def test_posterior_mean_with_true_x_0_at_t_1(linear):
    # DDPM eq. 7 written out by hand for t = 1 (0-based), whose previous step is t = 0
    x_0 = torch.full((1, 1, 1, 1), 0.3)
    x_t = torch.full((1, 1, 1, 1), -0.2)
    t = torch.tensor([1])
    mean, variance, _ = linear.q_posterior(x_0, x_t, t)
    a1, a0 = linear.alphas_cumprod[1], linear.alphas_cumprod[0]
    b1 = linear.betas[1]
    coef1 = b1 * a0.sqrt() / (1 - a1)
    coef2 = (1 - a0) * (1 - b1).sqrt() / (1 - a1)
    assert mean.item() == pytest.approx((coef1 * 0.3 + coef2 * -0.2).item(), rel=1e-6)
    assert variance.item() == pytest.approx(5.45319e-5, rel=1e-5)


@pytest.mark.parametrize("kwargs", [dict(schedule="sigmoid"), dict(num_timesteps=1)])
def test_bad_schedule_config(kwargs):
    with pytest.raises(DiffgenError):
        ScheduleConfig(**kwargs)
