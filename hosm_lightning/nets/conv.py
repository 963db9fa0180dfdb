"""A small convolutional ε-prediction network for images: smoke tests, CPU runs and benchmarks.

Not a paper model (DDPM++ / NCSN++ are the paper's CIFAR-10 networks); it is small enough to
differentiate three times on a CPU. Per-sample operations only (GroupNorm, no BatchNorm), so the
score stays batch-independent as the DSM losses require.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ScoreNet
from .toy import SinusoidalEmbedding

__all__ = ["SmallConvNet"]


class SmallConvNet(ScoreNet):
    """conv → (GroupNorm, SiLU, conv) × depth with a time embedding added after the first conv.

    Args:
        image_channels: channels of the data (3 for CIFAR-10).
        image_size: height = width of the data.
        channels: hidden channels.
        depth: number of hidden conv blocks.
        time_scale: the embedding sees ``time_scale * t`` (999 as DDPM++'s noise label).
    """

    def __init__(self, image_channels: int = 3, image_size: int = 32, channels: int = 32, depth: int = 2,
                 time_scale: float = 999.0):
        super().__init__()
        self.dim = image_channels * image_size * image_size
        self.time_scale = time_scale
        self.embed = nn.Sequential(SinusoidalEmbedding(channels), nn.Linear(channels, channels), nn.SiLU())
        self.inp = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(min(8, channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
            for _ in range(depth)
        )
        self.out = nn.Conv2d(channels, image_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, sigma: Tensor | None = None) -> Tensor:
        """ε̂(x, t); conditions on t only, so ``sigma`` (the ScoreNet convention) is ignored."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        h = self.inp(x) + self.embed(self.time_scale * t)[:, :, None, None]
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
