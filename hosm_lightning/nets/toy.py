"""The paper's toy score network for 1-D / 2-D data (docs/design.md §5).

Architecture (Lu et al. 2022, toy experiments): an x-encoder MLP dim→128→128→128, a fairseq-style
sinusoidal embedding of the *raw* time t (64 features) followed by a t-encoder MLP 64→128→128→128,
and a decoder MLP on the concatenation 256→512→512→dim. SiLU between layers, none at the outputs.
The output predicts the noise ε, so s_θ = -net(x, t) / σ(t) (see :class:`~hosm_lightning.nets.ScoreModel`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ScoreNet

__all__ = ["SinusoidalEmbedding", "ToyScoreNet", "mlp"]


def mlp(sizes: list[int], act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    """Linear layers ``sizes[0]→sizes[1]→…→sizes[-1]`` with ``act`` between them (not after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(act())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class SinusoidalEmbedding(nn.Module):
    """Fairseq / DDPM sinusoidal embedding of a scalar per sample: [sin(t ω_k), cos(t ω_k)].

    half = dim // 2 and ω_k = exp(-k ln(10000) / (half - 1)), k = 0..half-1; an odd ``dim`` is
    zero-padded by one column. Input t: [B] (any float); output [B, dim] in t's dtype.
    """

    def __init__(self, dim: int = 64, max_period: float = 10000.0):
        super().__init__()
        if dim < 4:
            raise ValueError(f"embedding dim must be >= 4, got {dim}")
        self.dim = dim
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - 1))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.reshape(-1, 1) * self.freqs.to(t.dtype)[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb


class ToyScoreNet(ScoreNet):
    """ε-prediction MLP of the paper's toy experiments; forward(x [B, dim], t [B], sigma=None) -> [B, dim].

    Parameter count: 469,377 for dim=1 and 470,018 for dim=2 (default widths).

    Args:
        dim: data dimension D (1 for mog1d, 2 for checkerboard / swissroll).
        encoder_width: width of the three-layer x- and t-encoder MLPs (paper: 128).
        embed_dim: number of sinusoidal features of t (paper: 64).
        decoder_width: width of the decoder MLP on the concatenated encodings (paper: 512).
    """

    def __init__(self, dim: int = 1, encoder_width: int = 128, embed_dim: int = 64, decoder_width: int = 512):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        w = encoder_width
        self.x_encoder = mlp([dim, w, w, w])
        self.t_embed = SinusoidalEmbedding(embed_dim)
        self.t_encoder = mlp([embed_dim, w, w, w])
        self.decoder = mlp([2 * w, decoder_width, decoder_width, dim])

    def forward(self, x: Tensor, t: Tensor, sigma: Tensor | None = None) -> Tensor:
        """ε̂(x, t); conditions on t only, so ``sigma`` (the ScoreNet convention) is ignored."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        h = torch.cat([self.x_encoder(x), self.t_encoder(self.t_embed(t))], dim=-1)
        return self.decoder(h)
