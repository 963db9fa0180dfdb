"""DDPM++ (continuous time): the ε-prediction U-Net of score_sde's VP / subVP CIFAR-10 models.

``DDPMpp(x, t)`` predicts the noise ε of x_t = a(t) x_0 + σ(t) z, so the score is
s_θ(x, t) = −DDPMpp(x, t) / σ(t): wrap it as ``ScoreModel(net, sde, 'eps')``. The noise label is
999·t (score_sde's continuous VP convention) with a sinusoidal embedding of nf features. Data are
expected in [−1, 1] (``data.init_args.centered: true``); the net does not rescale its input.

Configuration (defaults = score_sde ``vp/cifar10_ddpmpp_continuous``): nf 128, ch_mult (1, 2, 2, 2),
4 residual blocks per resolution (8 for the "deep" variant), attention at 16×16, dropout 0.1,
BigGAN residual blocks with plain (nearest / average-pool) resampling (fir=False),
skip_rescale, GroupNorm (min(C/4, 32) groups), SiLU, no progressive input/output, zero-ish
initialisation (init_scale 0) of the last conv of every block and of the output conv.

Parameter counts (measured with this code, 3×32×32): 61,804,419 with 4 blocks per resolution
(default) and 106,632,579 with 8 (deep); all trainable, no persistent buffers. These are counts of
this implementation; a published figure for score_sde's model could not be verified here, so none is
quoted (loading a real checkpoint is the definitive check: names and shapes must match one-to-one).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import ScoreNet
from .unet import UNetBody

__all__ = ["DDPMpp"]


class DDPMpp(UNetBody, ScoreNet):
    """ε-prediction DDPM++ (VP / subVP). forward(x [B,C,H,W], t [B] or scalar, sigma=None) → ε̂ of x's shape.

    Args:
        image_size: height = width of the images (``dim = in_channels·image_size²``).
        in_channels: channels of the images (3 for CIFAR-10).
        nf: base number of channels (paper: 128).
        ch_mult: channel multiplier of every resolution level (paper: 1, 2, 2, 2).
        num_res_blocks: residual blocks per level (4; 8 is the "deep" model).
        attn_resolutions: resolutions with self-attention (paper: 16).
        dropout: dropout rate in the residual blocks (paper: 0.1).
        time_scale: noise label = time_scale·t (999 as score_sde's continuous VP models).
        skip_rescale: scale skip connections by 1/√2 (score_sde's setting).
        init_scale: scale of the zero-ish initialisation of the last conv of each block.
        fir: FIR up/down-sampling (False for DDPM++).
        fir_kernel: the FIR kernel when ``fir`` is true.
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
        time_scale: float = 999.0,
        skip_rescale: bool = True,
        init_scale: float = 0.0,
        fir: bool = False,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        checkpoint_blocks: bool = False,
    ):
        super().__init__(
            image_size=image_size, in_channels=in_channels, nf=nf, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, fir=fir, fir_kernel=fir_kernel,
            skip_rescale=skip_rescale, embedding="positional", progressive_input="none", init_scale=init_scale,
            checkpoint_blocks=checkpoint_blocks,
        )
        self.time_scale = float(time_scale)

    def forward(self, x: Tensor, t, sigma: Tensor | None = None) -> Tensor:
        """ε̂(x, t) from the noise label ``time_scale·t``; ``sigma`` (the ScoreNet convention) is ignored."""
        return self.forward_label(x, self.time_scale * self._time(x, t))
