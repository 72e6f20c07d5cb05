"""The pure helpers of diffgen.bench; nothing here is timed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from diffgen import bench
from diffgen.errors import DiffgenError
from diffgen.unet import UNet, UNetConfig, count_parameters


def test_flops_of_one_conv_layer() -> None:
    # 4 output channels x 8 x 8 positions, each a 1 x 3 x 3 dot product: 2 * 256 * 9 FLOPs.
    conv = nn.Conv2d(1, 4, 3, padding=1)
    x = torch.randn(1, 1, 8, 8)
    assert bench.flops_per_call(lambda: conv(x)) == 2 * 4 * 8 * 8 * 9


def test_flops_of_a_linear_layer() -> None:
    linear = nn.Linear(3, 5)
    x = torch.randn(2, 3)
    assert bench.flops_per_call(lambda: linear(x)) == 2 * 2 * 3 * 5


def test_closest_picks_nearest_and_first_on_a_tie() -> None:
    assert bench.closest([1, 5, 9], lambda v: v * 10, 48) == (5, 50)
    assert bench.closest([4, 6], lambda v: v, 5) == (4, 4)
    with pytest.raises(DiffgenError):
        bench.closest([], lambda v: v, 5)


def fake_count(kwargs: dict) -> int:
    """A stand-in for UNet2DModel's parameter count: grows with depth and width squared."""
    return (2 * kwargs["layers_per_block"] + 1) * 9 * sum(c * c for c in
                                                          kwargs["block_out_channels"])


@pytest.mark.parametrize("target", [50_000, 400_000, 1_600_000])
def test_search_lands_within_ten_percent(target: int) -> None:
    config = UNetConfig(base_channels=24, channel_mult=(1, 2, 4), num_groups=8, num_heads=4)
    kwargs, count = bench.search_diffusers_config(config, fake_count, target)
    assert count == fake_count(kwargs)
    assert abs(bench.relative_difference(count, target)) < 0.10
    channels = kwargs["block_out_channels"]
    assert all(c % config.num_groups == 0 for c in channels)
    assert kwargs["attention_head_dim"] * config.num_heads == channels[-1]
    assert kwargs["down_block_types"] == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert kwargs["up_block_types"] == ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert kwargs["num_class_embeds"] == config.num_classes + 1


def test_search_with_real_diffusers_matches_diffgen_size() -> None:
    diffusers = pytest.importorskip("diffusers")
    config = UNetConfig()
    target = count_parameters(UNet(config))
    kwargs, count = bench.search_diffusers_config(
        config, lambda kw: bench.count_diffusers_parameters(diffusers, kw), target, layers=(1,))
    assert abs(bench.relative_difference(count, target)) < 0.10


def test_load_diffusers_is_none_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    assert bench.load_diffusers() is None


def test_peak_share() -> None:
    # 1 MFLOP per eval, 50 evals per image, 10 images/s = 500 MFLOP/s of a 1 GFLOP/s peak.
    assert bench.peak_share(10 ** 6, 50, 10.0, 1e9) == pytest.approx(0.5)


def report(with_diffusers: bool) -> dict:
    dg = {"config": UNetConfig().to_dict(), "parameters": 1000, "flops_per_image_eval": 2e6,
          "sample_images_per_s_fp32": 10.0, "sample_images_per_s_bf16": 20.0,
          "train_images_per_s_bf16": 30.0, "bf16_peak_share": 0.05}
    df = {"version": "0", "config": bench.diffusers_kwargs(UNetConfig(), (32, 64, 64), 1),
          "parameters": 990, "parameters_vs_diffgen": -0.01, "flops_per_image_eval": 3e6,
          "sample_images_per_s_fp32": 5.0, "sample_images_per_s_bf16": 8.0}
    out = {"torch": "x", "threads": 1, "cpu": "cpu", "weights": "w", "steps": 50,
           "batch_size": 64, "repeats": 3, "train_batch_size": 128,
           "matmul_gflops": {"fp32": 1.0, "bf16": 2.0}, "diffgen": dg,
           "diffusers": df if with_diffusers else None}
    if with_diffusers:
        out["ratio_diffgen_over_diffusers"] = {"fp32": 2.0, "bf16": 2.5, "best": 2.5}
        speeds = {"unguided": 20.0, "classifier": 12.5, "cfg": 10.0, "both": 8.0}
        out["guidance"] = {"classifier_parameters": 700, "classifier_forward_backward_flops": 3e6,
                           "images_per_s_bf16": speeds,
                           "time_vs_unguided": {k: 20.0 / v for k, v in speeds.items()}}
    return out


@pytest.mark.parametrize("with_diffusers", [True, False])
def test_format_report(with_diffusers: bool) -> None:
    text = bench.format_report(report(with_diffusers))
    assert "sample img/s bf16" in text
    assert ("2.50" in text) == with_diffusers
    # guidance: classifier 20 / 12.5 = 1.60x the time of unguided sampling, cfg 2.00x
    lines = [line.split() for line in text.splitlines()]
    assert (["classifier", "guidance", "12.50", "img/s", "1.60x", "the", "time"] in lines
            ) == with_diffusers
    assert (["classifier-free", "guidance", "10.00", "img/s", "2.00x", "the", "time"] in lines
            ) == with_diffusers
    assert all(len(line) <= 100 for line in text.splitlines())


def test_package_does_not_import_diffusers() -> None:
    code = ("import sys, diffgen.cli, diffgen.bench, diffgen.pipeline, diffgen.training; "
            "sys.exit('diffusers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
