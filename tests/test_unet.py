"""U-Net config validation, shapes and half-precision safety (CASES U1, U2, P1)."""

import pytest
import torch

from diffgen.errors import DiffgenError
from diffgen.unet import AttentionBlock, GroupNorm32, UNet, UNetConfig, count_parameters


def test_groups_must_divide_every_level():  # U1
    with pytest.raises(DiffgenError, match="level 0 has 24 channels.*32 GroupNorm groups"):
        UNetConfig(base_channels=24, num_groups=32)
    UNetConfig(base_channels=32, channel_mult=(1, 2, 2), num_groups=8)


def test_three_downsamplings_on_28_are_rejected():  # U2
    with pytest.raises(DiffgenError, match="not divisible by 8"):
        UNetConfig(channel_mult=(1, 2, 2, 2))


@pytest.mark.parametrize("size", [(28, 28), (28, 32)])
def test_two_downsamplings_keep_the_shape(size, tiny_config):
    config = UNetConfig(**{**tiny_config.to_dict(), "image_size": size, "channel_mult": (1, 2, 2),
                           "attention_resolutions": (7,)})
    model = UNet(config)
    x = torch.randn(2, 1, *size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == x.shape


def test_rgb_images(tiny_config):
    model = UNet(UNetConfig(**{**tiny_config.to_dict(), "in_channels": 3,
                               "image_size": (16, 16), "attention_resolutions": (8,)}))
    assert model(torch.randn(1, 3, 16, 16), torch.tensor([5])).shape == (1, 3, 16, 16)


def test_attention_resolution_must_exist():
    with pytest.raises(DiffgenError, match="attention resolution 8 is not a level"):
        UNetConfig(attention_resolutions=(8,))


def test_config_round_trip(tiny_config):
    assert UNetConfig.from_dict(tiny_config.to_dict()) == tiny_config
    with pytest.raises(DiffgenError, match="unknown model config keys: colour"):
        UNetConfig.from_dict({**tiny_config.to_dict(), "colour": 1})


def test_shipped_default_size():
    # The default config is the shipped model's: 1,607,857 parameters.
    assert count_parameters(UNet(UNetConfig())) == 1_607_857


def test_class_changes_the_output_and_null_class_is_unconditional(tiny_config):
    torch.manual_seed(0)
    model = UNet(tiny_config)
    for p in model.parameters():  # leave the zero-initialised identity start
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([500])
    out_3, out_7 = model(x, t, torch.tensor([3])), model(x, t, torch.tensor([7]))
    assert not torch.allclose(out_3, out_7)
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.tensor([10])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_activations_stay_finite_in_half_precision(dtype):  # P1
    torch.manual_seed(0)
    attention = AttentionBlock(64, 8, 4)
    torch.nn.init.normal_(attention.proj.weight, std=0.1)
    h = (torch.randn(2, 64, 7, 7) * 300).to(dtype)
    with torch.no_grad():
        attention.to(dtype)
        out = attention(h)
        norm = GroupNorm32(8, 64).to(dtype)(h)  # squares of 300 are past fp16 max 65504
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.isfinite(norm).all()
    # The naive product overflows fp16: that is what the float32 scores avoid.
    if dtype == torch.float16:
        assert not torch.isfinite(torch.tensor(256.0, dtype=dtype) ** 2 * 256).all()


def test_forward_under_bf16_autocast_with_large_inputs(tiny_config):  # P1
    model = UNet(tiny_config)
    x = torch.randn(2, 1, 28, 28) * 300
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.isfinite(out).all()


def test_bf16_group_norm_keeps_layout_and_float32_statistics():
    torch.manual_seed(0)
    norm = GroupNorm32(8, 48)
    h = (torch.randn(2, 48, 7, 7) * 3 + 300).bfloat16().to(memory_format=torch.channels_last)
    out = norm(h)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    reference = torch.nn.functional.group_norm(h.float(), 8, norm.weight, norm.bias, norm.eps)
    # Statistics in bf16 would be ruined by the offset of 300; in float32 only the output's
    # bf16 rounding (2^-8 relative) remains.
    assert (out.float() - reference).abs().max().item() < 0.05
