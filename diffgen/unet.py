"""The class-conditional U-Net ε_θ(x_t, t, y) of Ho et al. (2020) with the AdaGN of Dhariwal &
Nichol (2021).

Each residual block normalises with ``GroupNorm(h) * (1 + y_s) + y_b``, where (y_s, y_b) are a
per-block projection of y = time embedding + class embedding. The class embedding has one extra
"null" row (index ``num_classes``) so one network predicts both conditional and unconditional
noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.errors import DiffgenError, InvalidSetting


@dataclass(frozen=True)
class UNetConfig:
    """The shape of the network; stored in every checkpoint so it can be rebuilt."""

    image_size: tuple[int, int] = (28, 28)  # (H, W) of the images
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    base_channels: int = 24  # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 4)  # channels per level = base * mult; one x2 down each
    num_res_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (7,)  # feature-map heights that get self-attention
    num_groups: int = 8  # GroupNorm groups; must divide every channel count
    num_heads: int = 4  # attention heads; must divide the channels where attention runs
    dropout: float = 0.0  # dropout inside residual blocks
    num_classes: int = 10  # class labels 0..K-1; label K is the null class
    embed_mult: int = 4  # time/class embedding width = base * embed_mult

    def __post_init__(self) -> None:
        # Frozen dataclasses built from JSON get lists; store tuples so configs compare equal.
        for name in ("image_size", "channel_mult", "attention_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        height, width = self.image_size
        if len(self.image_size) != 2 or height < 1 or width < 1:
            raise InvalidSetting(f"image size must be two positive ints, got {self.image_size}")
        if self.in_channels not in (1, 3):
            raise InvalidSetting(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not self.channel_mult or min(self.channel_mult) < 1 or self.base_channels < 1:
            raise InvalidSetting("base channels and channel multipliers must be positive")
        if self.num_res_blocks < 1:
            raise InvalidSetting(f"num_res_blocks must be at least 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidSetting(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise InvalidSetting(f"num_classes must be >= 0, got {self.num_classes}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            raise InvalidSetting(
                f"image size {height}x{width} is not divisible by {factor}, which "
                f"{len(self.channel_mult) - 1} downsamplings need; use fewer levels "
                f"(channel multipliers) or another image size"
            )
        for level, mult in enumerate(self.channel_mult):
            channels = self.base_channels * mult
            if channels % self.num_groups:
                raise InvalidSetting(
                    f"level {level} has {channels} channels, which {self.num_groups} GroupNorm "
                    f"groups do not divide; change base channels or groups"
                )
        heights = self.level_heights()
        for res in self.attention_resolutions:
            if res not in heights:
                raise InvalidSetting(
                    f"attention resolution {res} is not a level of this network "
                    f"(levels have heights {', '.join(map(str, heights))})"
                )
            channels = self.base_channels * self.channel_mult[heights.index(res)]
            if channels % self.num_heads:
                raise InvalidSetting(
                    f"{self.num_heads} attention heads do not divide {channels} channels "
                    f"at resolution {res}"
                )

    def level_heights(self) -> list[int]:
        return [self.image_size[0] // 2 ** i for i in range(len(self.channel_mult))]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise DiffgenError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**data)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim], always in float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32, so half precision cannot overflow.

    fp16 (and fp32) inputs go through float32 explicitly. bf16 inputs use the bf16 kernel,
    which already keeps its statistics in float32 (and bf16 has float32's range); on the CPU it
    is about 4x faster than a float32 round trip, but only on a contiguous layout, so a
    channels-last input is normalised contiguous and handed back channels-last.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if h.dtype == torch.bfloat16:
            channels_last = (h.dim() == 4 and not h.is_contiguous()
                             and h.is_contiguous(memory_format=torch.channels_last))
            out = F.group_norm(h.contiguous(), self.num_groups, weight, bias, self.eps)
            return out.to(memory_format=torch.channels_last) if channels_last else out
        return F.group_norm(h.float(), self.num_groups, weight, bias, self.eps).to(h.dtype)


class ResBlock(nn.Module):
    """Residual block with AdaGN: out = skip(h) + conv(dropout(SiLU(AdaGN(conv(SiLU(GN(h)))))))."""

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.embed = nn.Linear(embed_dim, 2 * out_ch)  # -> (y_s, y_b)
        self.norm2 = GroupNorm32(groups, out_ch, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.silu(self.norm1(h)))
        y_s, y_b = self.embed(y)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(out) * (1 + y_s) + y_b
        out = self.conv2(self.dropout(F.silu(out)))
        return self.skip(h) + out


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions; scores and softmax in float32."""

    def __init__(self, channels: int, groups: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = h.shape
        qkv = self.qkv(self.norm(h)).reshape(batch, 3, self.num_heads, -1, height * width)
        q, k, v = (qkv[:, i].transpose(-1, -2).float() for i in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # q·k / sqrt(d) inside, in float32
        out = out.transpose(-1, -2).reshape(batch, channels, height, width).to(h.dtype)
        return h + self.proj(out)


def attention_at(config: UNetConfig, level: int, channels: int) -> nn.Module:
    """Self-attention where the level's height is one of the attention resolutions."""
    if config.level_heights()[level] in config.attention_resolutions:
        return AttentionBlock(channels, config.num_groups, config.num_heads)
    return nn.Identity()


def build_down_path(config: UNetConfig, embed_dim: int) -> tuple[nn.ModuleList, list[int]]:
    """The downsampling half: per level, residual blocks (+ attention), then a stride-2 conv.

    Returns the layers and the channel count of every activation the up path takes as a skip,
    starting with the input convolution's; the last entry is the channel count at the bottom.
    """
    base = config.base_channels
    down = nn.ModuleList()
    skip_channels = [base]
    channels = base
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            out_ch = base * mult
            down.append(nn.ModuleList([
                ResBlock(channels, out_ch, embed_dim, config.num_groups, config.dropout),
                attention_at(config, level, out_ch)]))
            channels = out_ch
            skip_channels.append(channels)
        if level < len(config.channel_mult) - 1:
            down.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
            skip_channels.append(channels)
    return down, skip_channels


def build_middle(config: UNetConfig, channels: int, embed_dim: int) -> nn.ModuleList:
    """Residual block, self-attention, residual block at the lowest resolution."""
    return nn.ModuleList([
        ResBlock(channels, channels, embed_dim, config.num_groups, config.dropout),
        AttentionBlock(channels, config.num_groups, config.num_heads),
        ResBlock(channels, channels, embed_dim, config.num_groups, config.dropout),
    ])


def run_down_path(down: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor,
                  skips: list[torch.Tensor] | None = None) -> torch.Tensor:
    """h through the down path; every output is appended to ``skips`` when given."""
    for layer in down:
        if isinstance(layer, nn.ModuleList):
            h = layer[1](layer[0](h, emb))
        else:
            h = layer(h)
        if skips is not None:
            skips.append(h)
    return h


def run_middle(middle: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = middle[0](h, emb)
    h = middle[1](h)
    return middle[2](h, emb)


class UNet(nn.Module):
    """ε_θ(x_t, t, y): x_t [B, C, H, W], t int64 [B], y int64 [B] (num_classes = null)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        base, groups = config.base_channels, config.num_groups
        embed_dim = base * config.embed_mult
        self.time_embed = nn.Sequential(
            nn.Linear(base, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        self.class_embed = (nn.Embedding(config.num_classes + 1, embed_dim)
                            if config.num_classes else None)
        self.input_conv = nn.Conv2d(config.in_channels, base, 3, padding=1)

        def block(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, embed_dim, groups, config.dropout)

        self.down, skip_channels = build_down_path(config, embed_dim)
        channels = skip_channels[-1]
        self.middle = build_middle(config, channels, embed_dim)

        self.up = nn.ModuleList()
        for level in reversed(range(len(config.channel_mult))):
            out_ch = base * config.channel_mult[level]
            for i in range(config.num_res_blocks + 1):
                layers = [block(channels + skip_channels.pop(), out_ch),
                          attention_at(config, level, out_ch)]
                channels = out_ch
                if level > 0 and i == config.num_res_blocks:
                    layers.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                nn.Conv2d(channels, channels, 3, padding=1)))
                self.up.append(nn.ModuleList(layers))

        self.out = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                 nn.Conv2d(channels, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """y = time embedding + class embedding, passed through SiLU once for all blocks."""
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels))
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, self.null_class)
            emb = emb + self.class_embed(y)
        return F.silu(emb)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        emb = self.embed(t, y)
        skips = [self.input_conv(x_t)]
        h = run_down_path(self.down, skips[0], emb, skips)
        h = run_middle(self.middle, h, emb)

        for layers in self.up:
            h = layers[0](torch.cat([h, skips.pop()], dim=1), emb)
            for layer in layers[1:]:
                h = layer(h)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

