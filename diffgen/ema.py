"""Exponential moving average of the weights, with the warm-up that short runs need."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(k: int, max_decay: float) -> float:
    """Decay for the k-th update: min(max_decay, (1 + k) / (10 + k)).

    Without the warm-up, 0.9999 ** 10_000 = 0.37 of the random initialisation would remain
    after 10k steps; with it the decay is 0.55 at k = 10 and 0.9991 at k = 10^4.
    """
    return min(max_decay, (1 + k) / (10 + k))


class EMA:
    """Shadow copies of a model's floating-point tensors, kept in float32."""

    def __init__(self, model: nn.Module, max_decay: float) -> None:
        self.max_decay = max_decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, k: int) -> None:
        """shadow <- d * shadow + (1 - d) * weights, with d = ema_decay(k)."""
        decay = ema_decay(k, self.max_decay)
        for name, value in model.state_dict().items():
            self.shadow[name].lerp_(value.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(tensors[name])
