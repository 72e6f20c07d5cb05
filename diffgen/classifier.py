"""The noisy-image classifier p_φ(y | x_t, t) that classifier guidance differentiates.

Dhariwal & Nichol (2021), section 4: the U-Net's downsampling half and middle block, with the
same time embedding (there is no class input), then an attention-pooling head over the lowest
feature map. It is trained with cross-entropy on x_t = q_sample(x_0, t, eps) at t uniform over
0..T-1, so it can read a class off an image at every noise level the sampler visits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.device import Precision, autocast
from diffgen.unet import (GroupNorm32, UNetConfig, build_down_path, build_middle, run_down_path,
                          run_middle, timestep_embedding)


@dataclass(frozen=True)
class ClassifierConfig(UNetConfig):
    """The shape of the encoder, as for the U-Net; ``num_classes`` is the number of outputs."""


class AttentionPool(nn.Module):
    """Multi-head attention from one query (the mean feature) over all H*W positions.

    Each position gets a learned positional embedding; the attended vector is projected to the
    class logits. Scores and softmax run in float32, as in the U-Net's attention.
    """

    def __init__(self, height: int, width: int, channels: int, num_heads: int,
                 num_outputs: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.position = nn.Parameter(torch.randn(channels, height * width + 1) / channels ** 0.5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, num_outputs, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, channels = h.shape[:2]
        tokens = h.reshape(batch, channels, -1)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = tokens + self.position.to(tokens.dtype)[None]
        q, k, v = (part.reshape(batch, self.num_heads, channels // self.num_heads, -1)
                   .transpose(-1, -2).float() for part in self.qkv(tokens).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, heads, 1, d)
        out = out.transpose(-1, -2).reshape(batch, channels, 1).to(h.dtype)
        return self.proj(out)[:, :, 0]


class NoisyClassifier(nn.Module):
    """logits [B, K] = f(x_t [B, C, H, W], t int64 [B])."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        base = config.base_channels
        embed_dim = base * config.embed_mult
        self.time_embed = nn.Sequential(
            nn.Linear(base, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        self.input_conv = nn.Conv2d(config.in_channels, base, 3, padding=1)
        self.down, skip_channels = build_down_path(config, embed_dim)
        channels = skip_channels[-1]
        self.middle = build_middle(config, channels, embed_dim)
        height = config.level_heights()[-1]
        width = config.image_size[1] // 2 ** (len(config.channel_mult) - 1)
        self.out = nn.Sequential(GroupNorm32(config.num_groups, channels), nn.SiLU())
        self.pool = AttentionPool(height, width, channels, config.num_heads, config.num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time_embed(timestep_embedding(t, self.config.base_channels)))
        h = run_down_path(self.down, self.input_conv(x_t), emb)
        h = run_middle(self.middle, h, emb)
        return self.pool(self.out(h))


def log_prob_grad(classifier: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  precision: Precision) -> torch.Tensor:
    """∇_{x_t} log p_φ(y | x_t, t) for every sample [B, C, H, W], in float32.

    The classifier must be in eval mode (no dropout, no batch statistics), so summing the
    per-sample log-probabilities before one backward pass gives each sample its own gradient.
    """
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        with autocast(x.device, precision):
            logits = classifier(x, t)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        chosen = log_probs[torch.arange(x.shape[0], device=x.device), y]
        (grad,) = torch.autograd.grad(chosen.sum(), x)
    return grad
