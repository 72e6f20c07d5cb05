"""Classifier guidance (CASES G1-G4) and classifier-free guidance in both samplers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffgen.classifier import ClassifierConfig, NoisyClassifier, log_prob_grad
from diffgen.device import Precision
from diffgen.diffusion import GaussianDiffusion, ScheduleConfig
from diffgen.errors import DiffgenError, InvalidSetting
from diffgen.sampling import (Guidance, SamplerConfig, ddim_step, ddpm_step, guided_eps, sample,
                              timesteps_for)
from diffgen.unet import UNet, UNetConfig

from conftest import TINY

FP32 = Precision("fp32")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def linear() -> GaussianDiffusion:
    return GaussianDiffusion(ScheduleConfig())


@pytest.fixture(scope="module")
def unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(UNetConfig(**TINY))
    for p in model.parameters():  # zero-initialised outputs would hide any effect of guidance
        nn.init.normal_(p, std=0.05)
    nn.init.normal_(model.class_embed.weight, std=1.0)  # and so would near-equal classes
    return model.eval()


@pytest.fixture(scope="module")
def classifier() -> NoisyClassifier:
    torch.manual_seed(1)
    return NoisyClassifier(ClassifierConfig(**TINY)).eval()


# G1: log p(y | x) = sum(w * x) with w = 1 has gradient 1 everywhere; s = 1.

@pytest.mark.parametrize("variance", ["small", "large"])
def test_g1_ddpm_mean_moves_by_the_variance_times_the_gradient(linear, variance) -> None:
    gen = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)
    noise = torch.randn(2, 1, 4, 4, generator=gen)
    plain, _ = ddpm_step(linear, x_t, 500, eps, variance, True, noise)
    guided, _ = ddpm_step(linear, x_t, 500, eps, variance, True, noise,
                          score=1.0 * torch.ones_like(x_t))
    expected = 0.0100513 if variance == "small" else float(linear.betas[500])
    assert float(linear.posterior_variance[500]) == pytest.approx(0.0100513, rel=1e-5)
    torch.testing.assert_close(guided - plain, torch.full_like(x_t, expected), atol=1e-6, rtol=0)
    # Σ is the variance, not the standard deviation (which would move it by 0.1003)
    assert float((guided - plain).mean()) < 0.011


@pytest.mark.parametrize("clip", [True, False])
def test_g1_ddim_step_500_to_480_moves_x_prev_by_0_1047475(linear, clip) -> None:
    x_t, eps = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    plain, _ = ddim_step(linear, x_t, 500, 480, eps, 0.0, clip, None)
    guided, _ = ddim_step(linear, x_t, 500, 480, eps, 0.0, clip, None,
                          score=torch.ones_like(x_t))
    torch.testing.assert_close(guided - plain, torch.full_like(x_t, 0.1047475), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("t, t_prev", [(999, 979), (500, 480), (250, 0), (20, -1)])
def test_ddim_shift_is_the_eps_shift_carried_through_the_step(linear, t, t_prev) -> None:
    # eps moves by -sqrt(1 - ᾱ_t) s; x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev) eps then moves
    # by that times sqrt(1 - ᾱ_prev) - sqrt(ᾱ_prev) sqrt(1 - ᾱ_t) / sqrt(ᾱ_t).
    a_t = linear.alphas_cumprod[t]
    a_prev = linear.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0).double()
    d_eps = -(1 - a_t).sqrt() * 0.5
    expected = float(d_eps * ((1 - a_prev).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt()
                              / a_t.sqrt()))
    x_t = torch.full((1, 1, 2, 2), 0.3)
    eps = torch.full((1, 1, 2, 2), 0.2)
    plain, _ = ddim_step(linear, x_t, t, t_prev, eps, 0.0, False, None)
    guided, _ = ddim_step(linear, x_t, t, t_prev, eps, 0.0, False, None,
                          score=torch.full_like(x_t, 0.5))
    torch.testing.assert_close(guided - plain, torch.full_like(x_t, expected), atol=1e-5,
                               rtol=1e-4)


class LinearLogit(nn.Module):
    """Two classes with logits (sum(x), 0): ∇ log p(0 | x) = sigmoid(-sum(x)) everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[list[int], bool]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((t.tolist(), self.training))
        a = x.flatten(1).sum(1)
        return torch.stack([a, torch.zeros_like(a)], dim=1)


def test_log_prob_grad_is_the_analytic_gradient() -> None:
    x = torch.tensor([0.0, 0.25]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    grad = log_prob_grad(LinearLogit(), x, torch.tensor([7, 7]), torch.tensor([0, 1]), FP32)
    # class 0: sigmoid(-a) with a = 0 and 1; class 1: -sigmoid(a)
    expected = torch.tensor([0.5, -torch.sigmoid(torch.tensor(1.0)).item()])
    torch.testing.assert_close(grad, expected.reshape(2, 1, 1, 1).expand(2, 1, 2, 2))


def test_g3_batch_gradients_equal_each_sample_alone(classifier) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 28, 28, generator=gen)
    t, y = torch.tensor([900, 100]), torch.tensor([3, 7])
    both = log_prob_grad(classifier, x, t, y, FP32)
    for i in range(2):
        alone = log_prob_grad(classifier, x[i:i + 1], t[i:i + 1], y[i:i + 1], FP32)
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-6, rtol=1e-5)
    assert both.abs().sum() > 0 and not torch.allclose(both[0], both[1])


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_g3_classifier_sees_the_unets_x_t_and_t_in_eval_mode(unet, linear, method) -> None:
    spy = LinearLogit().train()
    unet_seen: list[list[int]] = []
    hook = unet.register_forward_pre_hook(lambda m, args: unet_seen.append(args[1].tolist()))
    try:
        sample(unet, linear, [0, 1], [0, 1], SamplerConfig(method, steps=5), CPU, FP32,
               guidance=Guidance(spy, 1.0))
    finally:
        hook.remove()
    assert [t for t, _ in spy.seen] == unet_seen
    assert [t[0] for t in unet_seen] == timesteps_for(5, 999) == [999, 749, 500, 250, 0]
    assert not any(training for _, training in spy.seen)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_g2_scale_zero_is_bit_identical_to_no_guidance(unet, linear, classifier, method) -> None:
    config = SamplerConfig(method, steps=4)
    plain = sample(unet, linear, [1, 2, 3], [5, 6, 7], config, CPU, FP32)
    for guidance in (Guidance(classifier, 0.0), Guidance(None, 0.0, 1.0),
                     Guidance(classifier, 0.0, 1.0)):
        assert torch.equal(sample(unet, linear, [1, 2, 3], [5, 6, 7], config, CPU, FP32,
                                  guidance=guidance), plain)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_g4_large_scales_change_the_samples(unet, linear, classifier, method) -> None:
    config = SamplerConfig(method, steps=4, clip_denoised=False)  # no saturation at +-1
    plain = sample(unet, linear, [1, 2], [5, 6], config, CPU, FP32)
    by_classifier = sample(unet, linear, [1, 2], [5, 6], config, CPU, FP32,
                           guidance=Guidance(classifier, 100.0))
    by_cfg = sample(unet, linear, [1, 2], [5, 6], config, CPU, FP32, guidance=Guidance(None, 0.0,
                                                                                       5.0))
    assert (by_classifier - plain).abs().mean() > 1e-3
    assert (by_cfg - plain).abs().mean() > 1e-3


class ClassOffset(nn.Module):
    """ε(x, t, y) = x + y (the null class is 10), counting forward calls and batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.config = UNetConfig(**TINY)
        self.batches: list[int] = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return x + y.float()[:, None, None, None]


def test_cfg_mixes_conditional_and_unconditional_in_one_batch() -> None:
    model, x = ClassOffset(), torch.zeros(2, 1, 2, 2)
    t, y = torch.tensor([5, 5]), torch.tensor([3, 4])
    eps = guided_eps(model, x, t, y, Guidance(cfg_scale=3.0), FP32)
    # eps_u + W (eps_c - eps_u) = 10 + 3 (y - 10)
    torch.testing.assert_close(eps[:, 0, 0, 0], torch.tensor([-11.0, -8.0]))
    assert model.batches == [4]
    assert torch.equal(guided_eps(model, x, t, y, Guidance(), FP32)[:, 0, 0, 0],
                       torch.tensor([3.0, 4.0]))
    assert torch.equal(guided_eps(model, x, t, y, Guidance(unconditional=True), FP32),
                       torch.full((2, 1, 2, 2), 10.0))
    assert torch.equal(guided_eps(model, x, t, y, Guidance(cfg_scale=0.0), FP32),
                       torch.full((2, 1, 2, 2), 10.0))
    assert model.batches == [4, 2, 2, 4]


def test_unconditional_with_a_classifier_steers_towards_the_class(unet, linear, classifier
                                                                  ) -> None:
    config = SamplerConfig("ddim", steps=3)
    free = sample(unet, linear, [10, 10], [0, 1], config, CPU, FP32)
    steered = sample(unet, linear, [4, 4], [0, 1], config, CPU, FP32,
                     guidance=Guidance(classifier, 0.0, unconditional=True))
    assert torch.equal(free, steered)  # the U-Net sees the null class, whatever the label
    pushed = sample(unet, linear, [4, 4], [0, 1], config, CPU, FP32,
                    guidance=Guidance(classifier, 50.0, unconditional=True))
    assert (pushed - free).abs().mean() > 1e-3


def test_guidance_settings_are_checked(unet, linear, classifier) -> None:
    with pytest.raises(InvalidSetting, match="classifier-scale"):
        Guidance(classifier, -1.0)
    with pytest.raises(InvalidSetting, match="cfg-scale"):
        Guidance(cfg_scale=float("nan"))
    with pytest.raises(InvalidSetting, match=r"in \[0, 1000\]"):
        Guidance(classifier, 1001.0)
    with pytest.raises(InvalidSetting, match="needs a classifier"):
        Guidance(None, 2.0)
    with pytest.raises(InvalidSetting, match="unconditional"):
        Guidance(cfg_scale=2.0, unconditional=True)
    with pytest.raises(InvalidSetting, match="give --class"):
        sample(unet, linear, [10], [0], SamplerConfig(), CPU, FP32, guidance=Guidance(classifier,
                                                                                    1.0))
    with pytest.raises(InvalidSetting, match="give --class"):
        sample(unet, linear, [10], [0], SamplerConfig(), CPU, FP32, guidance=Guidance(cfg_scale=2))


def test_guided_bf16_sampling_is_finite_and_close_to_fp32(unet, linear, classifier) -> None:
    config, guidance = SamplerConfig("ddim", steps=3), Guidance(classifier, 2.0, 2.0)
    full = sample(unet, linear, [1, 2], [0, 1], config, CPU, FP32, guidance=guidance)
    half = sample(unet, linear, [1, 2], [0, 1], config, CPU, Precision("bf16"), guidance=guidance)
    assert torch.isfinite(half).all()
    assert (half - full).abs().mean() < 0.1


class NaNModel(ClassOffset):
    def forward(self, x, t, y):
        return torch.full_like(x, float("nan"))


def test_non_finite_samples_are_an_error_not_black_images(linear) -> None:
    with pytest.raises(DiffgenError, match="non-finite"):
        sample(NaNModel(), linear, [1], [0], SamplerConfig(steps=2, clip_denoised=False), CPU,
               FP32)
