"""NCSN++ (continuous time): the score U-Net of score_sde's VE CIFAR-10 models.

``NCSNpp(x, t, sigma)`` returns the **score** s_θ(x, t) directly (``scale_by_sigma``: the U-Net output
is divided by σ), so wrap it as ``ScoreModel(net, sde, 'score')``. The net conditions on the noise
level σ = σ(t) that :class:`~.score.ScoreModel` hands it (``sde.marginal(t)[1]``; for the VE SDE
σ(t) = σ_min (σ_max/σ_min)^t) and embeds log σ with Gaussian Fourier features (scale 16), as
score_sde does with its noise label σ(t). It has no noise schedule of its own: the SDE is the single
source of σ_min/σ_max, and the net follows whatever SDE it is wrapped with. Called without
``sigma`` it raises a ValueError.

Data range: with ``centered=False`` (default; score_sde's VE configs) the data are in [0, 1] and the
net maps x → 2x − 1 before the first conv. The score is still the score of the [0, 1]-valued x_t:
the rescaling is part of the network, not of the data. Use ``centered=True`` for [−1, 1] data.

Configuration (defaults = score_sde ``ve/cifar10_ncsnpp_continuous``): nf 128, ch_mult (1, 2, 2, 2),
4 residual blocks (8 deep), attention at 16×16, dropout 0.1, BigGAN blocks with FIR resampling
(kernel [1, 3, 3, 1]), ``progressive_input='residual'`` (an FIR-downsampled input pyramid added at
every downsampling), no progressive output, skip_rescale, GroupNorm, SiLU, init_scale 0.

Parameter counts (measured with this code, 3×32×32): 62,758,787 trainable parameters with 4 blocks
per resolution (default) and 107,586,947 with 8 (deep), plus the 128 fixed Fourier frequencies (a
persistent buffer). These are counts of this implementation; a published figure for score_sde's
model could not be verified here, so none is quoted.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import ScoreNet
from .unet import UNetBody

__all__ = ["NCSNpp"]


class NCSNpp(UNetBody, ScoreNet):
    """Score network NCSN++ (VE). forward(x [B,C,H,W], t [B], sigma [B]) → s_θ(x, t) of x's shape.

    ``sigma`` (required; [B] or a scalar, broadcast over the batch) is the noise level σ(t) of the
    SDE; ``t`` is accepted for the :class:`~.base.ScoreNet` convention and not used.

    Args:
        image_size: height = width of the images (``dim = in_channels·image_size²``).
        in_channels: channels of the images (3 for CIFAR-10).
        nf: base number of channels (paper: 128).
        ch_mult: channel multiplier of every resolution level (paper: 1, 2, 2, 2).
        num_res_blocks: residual blocks per level (paper: 4).
        attn_resolutions: resolutions with self-attention (paper: 16).
        dropout: dropout rate in the residual blocks (paper: 0.1).
        centered: data already in [−1, 1]; False maps x → 2x − 1 inside the net.
        scale_by_sigma: divide the U-Net output by σ(t) (True: the output is the score).
        fourier_scale: std of the Fourier frequencies (16).
        fir: FIR up/down-sampling (score_sde: true).
        fir_kernel: the FIR kernel (score_sde: 1, 3, 3, 1).
        progressive_input: 'residual' (score_sde: a downsampled input pyramid) or 'none'.
        skip_rescale: scale skip connections by 1/√2 (score_sde's setting).
        init_scale: scale of the zero-ish initialisation of the last conv of each block.
        checkpoint_blocks: activation checkpointing of every residual/attention block in training;
            first-order DSM only (HOSMModule refuses it with a stage of order 2 or 3).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        centered: bool = False,
        scale_by_sigma: bool = True,
        fourier_scale: float = 16.0,
        fir: bool = True,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        progressive_input: str = "residual",
        skip_rescale: bool = True,
        init_scale: float = 0.0,
        checkpoint_blocks: bool = False,
    ):
        super().__init__(
            image_size=image_size, in_channels=in_channels, nf=nf, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, fir=fir, fir_kernel=fir_kernel,
            skip_rescale=skip_rescale, embedding="fourier", fourier_scale=fourier_scale,
            progressive_input=progressive_input, init_scale=init_scale, checkpoint_blocks=checkpoint_blocks,
        )
        self.centered, self.scale_by_sigma = centered, scale_by_sigma

    def forward(self, x: Tensor, t, sigma: Tensor | None = None) -> Tensor:
        if sigma is None:
            raise ValueError(
                "NCSNpp conditions on the noise level σ(t): call it through ScoreModel (which passes "
                "sigma = sde.marginal(t)[1]) or pass sigma"
            )
        sigma = self._time(x, sigma)  # [B] in x's dtype (a scalar broadcasts)
        h = self.forward_label(x if self.centered else 2 * x - 1, torch.log(sigma))
        if self.scale_by_sigma:
            h = h / sigma.reshape(-1, 1, 1, 1)
        return h
