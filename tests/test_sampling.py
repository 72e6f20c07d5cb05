"""Sampler timesteps, DDIM and DDPM steps, and reproducibility (CASES T1-T3, D1-D3, S3, R1)."""

import pytest
import torch

from diffgen import sampling
from diffgen.device import Precision
from diffgen.diffusion import GaussianDiffusion, ScheduleConfig
from diffgen.errors import DiffgenError
from diffgen.sampling import SamplerConfig, ddim_sigma, ddim_step, ddpm_step, respace
from diffgen.unet import UNet, UNetConfig

FP32 = Precision("fp32")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def linear() -> GaussianDiffusion:
    return GaussianDiffusion(ScheduleConfig("linear", 1000))


class RecordingModel(torch.nn.Module):
    """Predicts a constant eps and records every t it is called with."""

    def __init__(self, eps_value: float = 0.0, config: UNetConfig | None = None):
        super().__init__()
        self.config = config or UNetConfig(base_channels=8, num_groups=4, channel_mult=(1, 2),
                                           attention_resolutions=())
        self.eps_value = eps_value
        self.calls: list[list[int]] = []

    def forward(self, x_t, t, y=None):
        self.calls.append(t.tolist())
        return torch.full_like(x_t, self.eps_value)


@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999, 1000])
def test_timesteps_start_at_T_minus_1_and_end_at_0(steps):  # T1
    ts = sampling.timesteps_for(steps, 999)
    assert len(ts) == steps
    assert ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert max(ts) < 1000 and min(ts) >= 0
    if steps >= 2:
        assert ts[-1] == 0


def test_fifty_steps_values():
    ts = sampling.timesteps_for(50, 999)
    assert ts[:3] == [999, 979, 958] and ts[-2:] == [20, 0]


def test_full_length_is_every_step_and_respacing_is_identity(linear):  # T2
    ts = sampling.timesteps_for(1000, 999)
    assert ts == list(range(999, -1, -1))
    chain = respace(linear, ts)
    assert (chain.betas - linear.betas).abs().max().item() < 1e-12
    assert (chain.posterior_variance - linear.posterior_variance).abs().max().item() < 1e-12


def test_sampler_first_model_call_is_at_T_minus_1(linear):  # T1, through the sampler
    for method in ("ddim", "ddpm"):
        model = RecordingModel()
        sampling.sample(model, linear, [0, 1], [0, 1], SamplerConfig(method, 50), CPU, FP32)
        calls = [c[0] for c in model.calls]
        assert calls[0] == 999 and calls[-1] == 0 and len(calls) == 50


def test_too_many_steps_is_a_clear_error(linear):
    with pytest.raises(DiffgenError, match="exceeds the model's T = 1000"):
        sampling.sample(RecordingModel(), linear, [0], [0], SamplerConfig("ddim", 1001), CPU,
                        FP32)


def test_ddim_eta_1_variance_equals_ddpm_posterior(linear):  # T3
    t = torch.arange(1, 1000)
    sigma = ddim_sigma(linear.alphas_cumprod[t], linear.alphas_cumprod[t - 1], 1.0)
    assert (sigma ** 2 - linear.posterior_variance[t]).abs().max().item() < 1e-12
    assert (sigma[499] ** 2).item() == pytest.approx(0.0100513, rel=1e-5)


def test_last_ddim_step_lands_on_x_0(linear):  # D1
    x_0, eps = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 1.0)
    x_t = linear.q_sample(x_0, torch.tensor([20]), eps)
    x_prev, _ = ddim_step(linear, x_t, 20, -1, eps, 0.0, clip_denoised=False, noise=None)
    torch.testing.assert_close(x_prev, x_0, atol=1e-6, rtol=0)
    wrong, _ = ddim_step(linear, x_t, 20, 0, eps, 0.0, clip_denoised=False, noise=None)
    assert wrong.flatten()[0].item() == pytest.approx(0.5099750, abs=1e-6)


def test_clipping_keeps_x_0_and_eps_consistent(linear):  # D2
    x_t = torch.full((1, 1, 1, 1), 0.5)
    t = torch.tensor([999])
    eps_pred = torch.zeros_like(x_t)
    assert linear.predict_x_0(x_t, t, eps_pred).item() == pytest.approx(78.705, rel=1e-4)
    x_prev, x_0_pred = ddim_step(linear, x_t, 999, 979, eps_pred, 0.0, True, None)
    assert x_0_pred.item() == 1.0
    a_t, a_prev = linear.alphas_cumprod[999], linear.alphas_cumprod[979]
    eps_used = (x_prev.double() - a_prev.sqrt()) / (1 - a_prev).sqrt()
    assert (a_t.sqrt() * 1.0 + (1 - a_t).sqrt() * eps_used).item() == pytest.approx(0.5, abs=1e-6)


def test_eta_0_is_deterministic_and_draws_nothing(linear, monkeypatch):  # D3
    torch.manual_seed(0)
    config = UNetConfig(base_channels=8, num_groups=4, channel_mult=(1, 2),
                        attention_resolutions=(14,), num_heads=2)
    model = UNet(config)
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)  # non-zero output
    draws = []
    original = sampling.SeededNoise.draw
    monkeypatch.setattr(sampling.SeededNoise, "draw", lambda self: draws.append(1)
                        or original(self))
    run = [sampling.sample(model, linear, [3, 4], [7, 8], SamplerConfig("ddim", 5), CPU, FP32)
           for _ in range(2)]
    rng_before = torch.get_rng_state()
    assert torch.equal(run[0], run[1])
    assert len(draws) == 2  # one starting-noise draw per run, none inside the loop
    assert torch.equal(rng_before, torch.get_rng_state())


def test_eta_1_draws_noise_each_step(linear, monkeypatch):
    draws = []
    original = sampling.SeededNoise.draw
    monkeypatch.setattr(sampling.SeededNoise, "draw", lambda self: draws.append(1)
                        or original(self))
    sampling.sample(RecordingModel(), linear, [0], [0], SamplerConfig("ddim", 5, eta=1.0), CPU,
                    FP32)
    assert len(draws) == 1 + 4  # start, then one per step except the last


def test_cosine_one_ddpm_step_from_T_keeps_unit_std():  # S3
    cosine = GaussianDiffusion(ScheduleConfig("cosine", 1000))
    x_t = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
    x_prev, _ = ddpm_step(cosine, x_t, 999, torch.zeros_like(x_t), "small", True, noise)
    assert x_prev.std().item() == pytest.approx(1.0, abs=0.03)
    unclipped, _ = ddpm_step(cosine, x_t, 999, torch.zeros_like(x_t), "small", False, noise)
    assert unclipped.std().item() > 20


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_step_at_t_0_is_finite_and_noise_free(schedule):  # S2
    chain = GaussianDiffusion(ScheduleConfig(schedule, 1000))
    x_t = torch.randn(8, 1, 4, 4)
    out, x_0_pred = ddpm_step(chain, x_t, 0, torch.randn_like(x_t), "large", True,
                              torch.randn_like(x_t))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, chain.q_posterior(x_0_pred, x_t, torch.zeros(8).long())[0])


def test_samples_do_not_depend_on_batch_size(linear):  # R1
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, num_groups=4, channel_mult=(1, 2),
                            attention_resolutions=(14,), num_heads=2))
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    labels, seeds = [0, 1, 2, 3, 4], [10, 11, 12, 13, 14]
    for method, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)):
        config = SamplerConfig(method, 4, eta=eta)
        whole = sampling.sample(model, linear, labels, seeds, config, CPU, FP32, batch_size=5)
        split = sampling.sample(model, linear, labels, seeds, config, CPU, FP32, batch_size=2)
        alone = sampling.sample(model, linear, labels[3:4], seeds[3:4], config, CPU, FP32)
        # Convolution kernels may sum in another order per batch size: 1e-4 is far below one
        # grey level of a PNG (2 / 255).
        torch.testing.assert_close(whole, split, atol=1e-4, rtol=0)
        torch.testing.assert_close(whole[3:4], alone, atol=1e-4, rtol=0)


def test_starting_noise_comes_from_the_per_sample_cpu_generator():  # R1
    noise = sampling.SeededNoise([5, 6], (1, 3, 3)).draw()
    expected = torch.randn((1, 3, 3), generator=torch.Generator().manual_seed(6))
    assert torch.equal(noise[1], expected)


def test_callback_sees_each_step(linear):
    states = []
    sampling.sample(RecordingModel(), linear, [0, 1], [0, 1], SamplerConfig("ddim", 3), CPU,
                    FP32, callback=states.append)
    assert [s["t"] for s in states] == [999, 500, 0]
    assert states[0]["x_t"].shape == (2, 1, 28, 28)
    assert set(states[0]) == {"i", "t", "x_t", "x_0_pred", "batch"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="euler"), "sampler 'euler'"), (dict(steps=0), "--steps"),
    (dict(eta=1.5), "--eta"), (dict(method="ddpm", eta=0.5), "DDIM only"),
    (dict(variance="learned"), "variance")])
def test_bad_sampler_config(kwargs, message):
    with pytest.raises(DiffgenError, match=message):
        SamplerConfig(**kwargs)


@pytest.mark.parametrize("method, variance", [("ddpm", "small"), ("ddpm", "large"),
                                              ("ddim", "small")])
def test_a_single_step_lands_on_x_0_pred(linear, method, variance):  # T1 with N = 1
    model = RecordingModel(eps_value=0.0)
    out = sampling.sample(model, linear, [0], [3], SamplerConfig(method, 1, variance=variance),
                          CPU, FP32)
    x_T = sampling.SeededNoise([3], (1, 28, 28)).draw()
    assert model.calls == [[999]]
    # eps = 0: x̂_0 = x_T / sqrt(ᾱ_999), clipped; one step to ᾱ = 1 returns it.
    expected = (x_T / linear.alphas_cumprod[999].sqrt()).clamp(-1, 1).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
