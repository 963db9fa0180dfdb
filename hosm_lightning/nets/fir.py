"""Resampling of image tensors [B, C, H, W] by a factor 2 with ordinary, differentiable ops.

Two families, as used by the NCSN++ / DDPM++ U-Nets (Song et al. 2021):

* plain: nearest-neighbour upsampling (a view + expand) and 2×2 average pooling (a reshape + mean);
* FIR ("upfirdn"): zero-insertion upsampling, zero padding and a depthwise convolution with the
  separable kernel k ⊗ k (k = [1, 3, 3, 1] by default, normalised to sum 1), then striding.

Nothing here is a custom ``autograd.Function`` or a compiled extension: only ``F.pad``, views and
``F.conv2d``. Hence forward-mode AD (``torch.func.jvp``) and any number of reverse passes work, which
third-order score matching needs (the reference CUDA ``upfirdn2d`` op has neither).

1-D closed forms for k = [1, 3, 3, 1] (zero outside the image), which the tests check:

* ``fir_upsample_2d``:   y[2i] = (x[i-1] + 3 x[i]) / 4,  y[2i+1] = (3 x[i] + x[i+1]) / 4;
* ``fir_downsample_2d``: y[j] = (x[2j-1] + 3 x[2j] + 3 x[2j+1] + x[2j+2]) / 8;

and the 2-D operators are the tensor products of the 1-D ones along H and W.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "fir_kernel_2d",
    "upfirdn2d",
    "fir_upsample_2d",
    "fir_downsample_2d",
    "fir_conv_downsample_2d",
    "naive_upsample_2d",
    "naive_downsample_2d",
]


def fir_kernel_2d(k: Sequence[float], dtype=torch.float32, device=None) -> Tensor:
    """Separable 2-D kernel k ⊗ k normalised to sum 1 (a 2-D input kernel is only normalised)."""
    k = torch.as_tensor(k, dtype=torch.float64, device=device)
    if k.dim() == 1:
        k = k[:, None] * k[None, :]
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return (k / k.sum()).to(dtype)


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion (``up``), pad (``pad`` = (before, after), both axes), filter, keep every ``down``-th.

    The filter step is a true convolution with ``kernel`` (the kernel is flipped before the
    cross-correlation of ``F.conv2d``; the symmetric FIR kernels here are unaffected). Output size
    per axis: (H·up + pad[0] + pad[1] − kh) // down + 1.
    """
    if x.dim() != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if up > 1:
        # [B,C,H,1,W,1] → pad the singleton axes with up-1 zeros → interleaved zeros along H and W
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    p0, p1 = pad
    if p0 < 0 or p1 < 0:
        raise ValueError(f"negative padding is not supported, got {pad}")
    x = F.pad(x, (p0, p1, p0, p1))
    kh, kw = kernel.shape
    weight = kernel.flip(0, 1).to(dtype=x.dtype, device=x.device).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def fir_upsample_2d(x: Tensor, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2, gain: float = 1.0) -> Tensor:
    """FIR upsampling: [B,C,H,W] → [B,C,H·factor,W·factor]; a constant image stays constant (inside)."""
    kernel = fir_kernel_2d(k, dtype=x.dtype, device=x.device) * (gain * factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample_2d(x: Tensor, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2, gain: float = 1.0) -> Tensor:
    """FIR downsampling (blur, then keep every ``factor``-th pixel): [B,C,H,W] → [B,C,H/factor,W/factor]."""
    kernel = fir_kernel_2d(k, dtype=x.dtype, device=x.device) * gain
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def fir_conv_downsample_2d(x: Tensor, weight: Tensor, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2,
                           gain: float = 1.0) -> Tensor:
    """FIR blur (padded for the conv footprint) then a strided convolution with ``weight`` [O, I, kh, kw].

    [B,I,H,W] → [B,O,H/factor,W/factor]; a learnable, anti-aliased stride-2 convolution (no bias).
    """
    kernel = fir_kernel_2d(k, dtype=x.dtype, device=x.device) * gain
    p = (kernel.shape[0] - factor) + (weight.shape[-1] - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


def naive_upsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour upsampling by ``factor`` (pure view/expand/reshape)."""
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, factor, w, factor).reshape(b, c, h * factor, w * factor)


def naive_downsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Average pooling over non-overlapping ``factor``×``factor`` windows."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))
