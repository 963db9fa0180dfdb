"""The NCSN++ / DDPM++ U-Net body shared by :class:`~.ddpmpp.DDPMpp` and :class:`~.ncsnpp.NCSNpp`.

Architecture (Song et al. 2021, "NCSN++"/"DDPM++", BigGAN residual blocks), for ``L = len(ch_mult)``
resolutions image_size / 2^i:

* noise-level embedding e (sinusoidal of a label, or Gaussian Fourier features) → Dense(4nf) → SiLU →
  Dense(4nf) = temb, fed to every residual block;
* input conv3x3 → nf channels;
* down path, level i: ``num_res_blocks`` blocks to nf·ch_mult[i] channels (each followed by
  self-attention if the resolution is in ``attn_resolutions``), then (i < L−1) a downsampling
  residual block; with ``progressive_input='residual'`` an input pyramid (the image, repeatedly
  downsampled by an FIR/strided conv) is added to that block's output, (a + b)/√2;
* middle: block, attention, block;
* up path, level i = L−1..0: ``num_res_blocks + 1`` blocks on [h, skip] concatenations, attention
  at attention resolutions, then (i > 0) an upsampling residual block;
* GroupNorm → SiLU → conv3x3 back to the image channels.

All sub-modules live, in the order in which the forward pass uses them, in one flat
``nn.ModuleList`` named ``all_modules``: the layout of score_sde_pytorch checkpoints, which therefore
load by name (see :mod:`.checkpoint_import`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .unet_layers import (
    AttnBlock,
    Downsample,
    GaussianFourierProjection,
    ResnetBlockBigGAN,
    SinusoidalEmbedding,
    conv3x3,
    dense,
    group_norm,
)

__all__ = ["UNetBody"]


EMBEDDINGS = ("positional", "fourier")
PROGRESSIVE_INPUTS = ("none", "residual")


class UNetBody(nn.Module):
    """NCSN++/DDPM++ U-Net; ``forward_label(x, label)`` maps an image and a per-sample noise label to
    an output of the image's shape. Subclasses turn t into the label and post-process the output.

    ``checkpoint_blocks=True`` recomputes each residual / attention block in the backward pass
    (``torch.utils.checkpoint``, non-reentrant) while training, trading compute for activation memory.
    First-order DSM only: the order-2/3 losses evaluate the net under ``torch.func.jvp``, and the
    recomputation (which runs without the forward-mode tangents) saves a different set of tensors, so
    torch raises a CheckpointError in the backward pass. ``HOSMModule`` therefore refuses
    ``checkpoint_blocks=True`` with a stage of order 2 or 3 when it is built. Evaluation (``eval()`` or
    no grad) never checkpoints.
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
        fir: bool = False,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        embedding: str = "positional",
        fourier_scale: float = 16.0,
        progressive_input: str = "none",
        init_scale: float = 0.0,
        checkpoint_blocks: bool = False,
    ):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if progressive_input not in PROGRESSIVE_INPUTS:
            raise ValueError(f"progressive_input must be one of {PROGRESSIVE_INPUTS}, got {progressive_input!r}")
        n_levels = len(ch_mult)
        if n_levels < 1 or num_res_blocks < 1 or nf < 4:
            raise ValueError("need len(ch_mult) >= 1, num_res_blocks >= 1 and nf >= 4")
        if image_size % 2 ** (n_levels - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{n_levels - 1}")
        self.image_size, self.in_channels = image_size, in_channels
        self.dim = in_channels * image_size * image_size
        self.nf, self.ch_mult, self.num_res_blocks = nf, tuple(ch_mult), num_res_blocks
        self.embedding, self.progressive_input = embedding, progressive_input
        self.skip_rescale, self.checkpoint_blocks = skip_rescale, checkpoint_blocks
        resolutions = [image_size // 2**i for i in range(n_levels)]
        self._attn = [r in tuple(attn_resolutions) for r in resolutions]

        temb_dim = 4 * nf
        mods: list[nn.Module] = []
        if embedding == "fourier":
            mods.append(GaussianFourierProjection(nf, scale=fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        self.pos_embed = SinusoidalEmbedding(nf) if embedding == "positional" else None  # no state
        mods += [dense(embed_dim, temb_dim), dense(temb_dim, temb_dim)]

        def block(in_ch, out_ch=None, **kw):
            return ResnetBlockBigGAN(in_ch, out_ch, temb_dim=temb_dim, dropout=dropout, fir=fir,
                                     fir_kernel=fir_kernel, skip_rescale=skip_rescale, init_scale=init_scale, **kw)

        def attn(ch):
            return AttnBlock(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        mods.append(conv3x3(in_channels, nf))
        skips, ch, pyramid_ch = [nf], nf, in_channels
        for i in range(n_levels):
            for _ in range(num_res_blocks):
                mods.append(block(ch, nf * ch_mult[i]))
                ch = nf * ch_mult[i]
                if self._attn[i]:
                    mods.append(attn(ch))
                skips.append(ch)
            if i < n_levels - 1:
                mods.append(block(ch, down=True))
                if progressive_input == "residual":
                    mods.append(Downsample(pyramid_ch, ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                    pyramid_ch = ch
                skips.append(ch)
        mods += [block(ch), attn(ch), block(ch)]
        for i in reversed(range(n_levels)):
            for _ in range(num_res_blocks + 1):
                mods.append(block(ch + skips.pop(), nf * ch_mult[i]))
                ch = nf * ch_mult[i]
            if self._attn[i]:
                mods.append(attn(ch))
            if i > 0:
                mods.append(block(ch, up=True))
        assert not skips
        mods += [group_norm(ch), conv3x3(ch, in_channels, init_scale=init_scale)]
        self.all_modules = nn.ModuleList(mods)

    # ------------------------------------------------------------------------------------------
    def _run(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward_label(self, x: Tensor, label: Tensor) -> Tensor:
        """U-Net output for images x [B, C, H, W] and noise labels [B] (the embedding's input)."""
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}], got {tuple(x.shape)}"
            )
        mods = iter(self.all_modules)
        nxt = lambda: next(mods)  # noqa: E731 - modules are consumed in construction order
        label = label.to(x.dtype)
        emb = nxt()(label) if self.embedding == "fourier" else self.pos_embed(label)
        temb = nxt()(emb)
        temb = nxt()(F.silu(temb))

        pyramid = x if self.progressive_input == "residual" else None
        hs = [nxt()(x)]
        n_levels = len(self.ch_mult)
        for i in range(n_levels):
            for _ in range(self.num_res_blocks):
                h = self._run(nxt(), hs[-1], temb)
                if self._attn[i]:
                    h = self._run(nxt(), h)
                hs.append(h)
            if i < n_levels - 1:
                h = self._run(nxt(), hs[-1], temb)
                if pyramid is not None:
                    pyramid = nxt()(pyramid)
                    pyramid = (pyramid + h) / math.sqrt(2.0) if self.skip_rescale else pyramid + h
                    h = pyramid
                hs.append(h)

        h = self._run(nxt(), hs[-1], temb)
        h = self._run(nxt(), h)
        h = self._run(nxt(), h, temb)
        for i in reversed(range(n_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = self._run(nxt(), torch.cat([h, hs.pop()], dim=1), temb)
            if self._attn[i]:
                h = self._run(nxt(), h)
            if i > 0:
                h = self._run(nxt(), h, temb)
        h = F.silu(nxt()(h))
        h = nxt()(h)
        assert not hs and next(mods, None) is None
        return h

    def _time(self, x: Tensor, t) -> Tensor:
        return torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
