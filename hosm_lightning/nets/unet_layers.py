"""Building blocks of the NCSN++ / DDPM++ U-Nets (Song et al. 2021), in plain PyTorch.

Every block is per-sample (GroupNorm, no batch statistics) and built from ordinary differentiable
ops, so ``torch.func.jvp`` and repeated ``autograd.grad(create_graph=True)`` work through it: the
third-order DSM loss differentiates the network three times.

Sub-module and parameter *names* follow the score_sde_pytorch checkpoint layout (``GroupNorm_0``,
``Conv_0``, ``Dense_0``, ``NIN_0.W`` …) and parameters are registered in the same order, so that a
published checkpoint maps onto these modules by name (:mod:`.checkpoint_import`). The code itself is
written from the architecture description.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fir import (
    fir_conv_downsample_2d,
    fir_downsample_2d,
    fir_upsample_2d,
    naive_downsample_2d,
    naive_upsample_2d,
)
from .toy import SinusoidalEmbedding

__all__ = [
    "variance_scaling_",
    "group_norm",
    "conv3x3",
    "conv1x1",
    "dense",
    "SinusoidalEmbedding",
    "GaussianFourierProjection",
    "NIN",
    "AttnBlock",
    "ResnetBlockBigGAN",
    "Downsample",
    "Upsample",
]


# ------------------------------------------------------------------------------------------------
# initialisation and plain layers
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def variance_scaling_(w: Tensor, scale: float = 1.0) -> Tensor:
    """Uniform 'fan_avg' variance scaling: Var = scale / ((fan_in + fan_out) / 2); scale 0 → 1e-10.

    Fans: Linear / NIN [a, b] → a + b; conv [O, I, kh, kw] → (O + I)·kh·kw.
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = w[0, 0].numel() if w.dim() > 2 else 1
    fan_avg = (w.shape[0] + w.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    return w.uniform_(-bound, bound)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(channels // 4, 32) groups (at least 1) and eps 1e-6."""
    return nn.GroupNorm(num_groups=max(1, min(channels // 4, 32)), num_channels=channels, eps=1e-6)


def _conv(in_ch: int, out_ch: int, k: int, stride: int, padding: int, init_scale: float) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=padding)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, padding: int = 1, init_scale: float = 1.0) -> nn.Conv2d:
    return _conv(in_ch, out_ch, 3, stride, padding, init_scale)


def conv1x1(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    return _conv(in_ch, out_ch, 1, 1, 0, init_scale)


def dense(in_dim: int, out_dim: int, init_scale: float = 1.0) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim)
    variance_scaling_(lin.weight, init_scale)
    nn.init.zeros_(lin.bias)
    return lin


# ------------------------------------------------------------------------------------------------
# noise-level embeddings
# ------------------------------------------------------------------------------------------------
class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2π u W), cos(2π u W)] of a scalar u per sample; W ~ N(0, scale²).

    W (``embedding_size`` frequencies) is a fixed, persistent buffer: it is saved and loaded with the
    state dict but never trained (score_sde stores it as a ``requires_grad=False`` parameter, which
    likewise is excluded from its EMA list). Output [B, 2·embedding_size].
    """

    def __init__(self, embedding_size: int = 256, scale: float = 16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(embedding_size) * scale)

    def forward(self, u: Tensor) -> Tensor:
        proj = u.reshape(-1, 1) * self.W.to(u.dtype)[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
class NIN(nn.Module):
    """Per-pixel linear map ("network in network"): y[b,:,h,w] = x[b,:,h,w] @ W + b, W of shape [in, out]."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(variance_scaling_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, residual; (x + h)/√2 if ``skip_rescale``."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(hn).flatten(2), self.NIN_1(hn).flatten(2), self.NIN_2(hn).flatten(2)  # [B,C,N]
        logits = torch.einsum("bcn,bcm->bnm", q, k) * (c**-0.5)
        attn = torch.softmax(logits, dim=-1)
        out = torch.einsum("bnm,bcm->bcn", attn, v).reshape(b, c, h, w)
        out = self.NIN_3(out)
        return (x + out) / math.sqrt(2.0) if self.skip_rescale else x + out


# ------------------------------------------------------------------------------------------------
# residual block
# ------------------------------------------------------------------------------------------------
class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block with optional 2× up/down sampling inside the block.

    h = Conv_1(Dropout(SiLU(GN_1(Conv_0(resample(SiLU(GN_0(x)))) + Dense_0(SiLU(temb))))))
    skip = Conv_2(resample(x)) (1×1) if the channels or the resolution change, else x;
    out = (skip + h)/√2 if ``skip_rescale`` else skip + h. Resampling is FIR (``fir``) or plain
    (nearest / average pooling). ``Conv_1`` starts near zero for ``init_scale=0``.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None, up: bool = False,
                 down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("a block cannot both upsample and downsample")
        out_ch = out_ch or in_ch
        self.in_ch, self.out_ch, self.up, self.down = in_ch, out_ch, up, down
        self.fir, self.fir_kernel, self.skip_rescale = fir, tuple(fir_kernel), skip_rescale
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv1x1(in_ch, out_ch)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return fir_upsample_2d(x, self.fir_kernel) if self.fir else naive_upsample_2d(x)
        if self.down:
            return fir_downsample_2d(x, self.fir_kernel) if self.fir else naive_downsample_2d(x)
        return x

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


# ------------------------------------------------------------------------------------------------
# stand-alone resampling layers
# ------------------------------------------------------------------------------------------------
class _FIRConvDown(nn.Module):
    """Anti-aliased stride-2 3×3 convolution: FIR blur then strided conv, plus a bias."""

    def __init__(self, in_ch: int, out_ch: int, fir_kernel: Sequence[int], kernel: int = 3):
        super().__init__()
        self.fir_kernel = tuple(fir_kernel)
        self.weight = nn.Parameter(variance_scaling_(torch.empty(out_ch, in_ch, kernel, kernel)))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        return fir_conv_downsample_2d(x, self.weight, self.fir_kernel) + self.bias[None, :, None, None]


class Downsample(nn.Module):
    """2× downsampling layer.

    * ``fir=False``: stride-2 3×3 conv after padding (0, 1, 0, 1) (``with_conv``), else 2×2 average pooling;
    * ``fir=True``: FIR blur + stride-2 3×3 conv (``with_conv``, used for NCSN++'s residual input
      pyramid), else FIR downsampling.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if not with_conv and out_ch != in_ch:
            raise ValueError("changing the channel count needs with_conv=True")
        self.with_conv, self.fir, self.fir_kernel = with_conv, fir, tuple(fir_kernel)
        if with_conv and fir:
            self.Conv2d_0 = _FIRConvDown(in_ch, out_ch, fir_kernel)
        elif with_conv:
            self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else fir_downsample_2d(x, self.fir_kernel)
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return naive_downsample_2d(x)


class Upsample(nn.Module):
    """2× upsampling layer: nearest (+ 3×3 conv if ``with_conv``) or FIR (``fir=True``, no conv).

    The fused FIR transposed convolution (``fir=True, with_conv=True``) is not implemented: neither the
    DDPM++ nor the NCSN++ CIFAR-10 configuration uses it (BigGAN blocks resample inside the block).
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if fir and with_conv:
            raise NotImplementedError("FIR upsampling with a fused convolution is not implemented")
        if not with_conv and out_ch != in_ch:
            raise ValueError("changing the channel count needs with_conv=True")
        self.with_conv, self.fir, self.fir_kernel = with_conv, fir, tuple(fir_kernel)
        if with_conv:
            self.Conv_0 = conv3x3(in_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        if self.fir:
            return fir_upsample_2d(x, self.fir_kernel)
        h = naive_upsample_2d(x)
        return self.Conv_0(h) if self.with_conv else h
