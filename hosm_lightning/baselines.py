"""Reference bits/dim for quantised images: a full-covariance Gaussian and the lossless codecs.

Images are uint8 [N, C, H, W] of grey levels k ∈ {0..L−1}; D = C·H·W sub-pixels per image. Units
are bits per sub-pixel, the same number as a diffusion model's bits/dim on the same images.

* Gaussian: y = (k + u)/L, u ~ U[0,1)^D, mapped to model space (2y − 1 when ``centered``) exactly
  as the uniform protocol of ``core.dequantization.bits_per_dim`` does. On the dequantized training
  points, maximum likelihood gives μ = mean(y), Σ = (1/N) Σ_n (y_n − μ)(y_n − μ)ᵀ (float64), plus a
  ridge ``RIDGE`` · w²/12 on the diagonal, w the bin width in model space (1/L, or 2/L in [−1, 1]).
  w²/12 is the variance of the dequantization noise, a floor under the variance of the dequantized
  data in every direction, so Σ is positive definite anyway (for N ≥ D + 1) and the ridge, a guard
  only, moves the result by about RIDGE/(2 ln 2) ≈ 7e-7 bits/dim.
  Each test image then gets, with K = 1,

      bpd = −log N(y; μ, Σ)/(D ln 2) + log₂ L          ([0, 1]; + log₂ L − 1 in [−1, 1])

  which is the same number in both model spaces (the ridge scales with the bin width).
* Codecs: bits per sub-pixel = 8 · (file bytes, headers included) / (N·C·H·W) of one lossless
  PNG or WebP file holding all N images tiled, checked to decode back exactly.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .core.data_range import check_levels
from .core.dequantization import bits_per_dim, dequantization_draws
from .core.stats import mean_se

__all__ = ["CODECS", "RIDGE", "codec_bits_per_subpixel", "fit_gaussian", "gaussian_bits_per_dim",
           "reference_rows"]

#: ridge added to Σ's diagonal, as a fraction of the dequantization noise variance w²/12
RIDGE = 1e-6
CODECS = ("png", "webp")
_MODES = {1: "L", 3: "RGB"}
_SAVE = {"png": {"format": "PNG", "optimize": True, "compress_level": 9},
         "webp": {"format": "WEBP", "lossless": True, "quality": 100, "method": 6}}
_WEBP_MAX_SIDE = 16383


def _check_images(x, levels: int, name: str) -> None:
    """ValueError unless ``x`` is a uint8 tensor [N, C, H, W], N >= 1, with values < ``levels``."""
    if not isinstance(x, Tensor) or x.dtype != torch.uint8:
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a uint8 tensor of grey levels [N, C, H, W], got {kind}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, C, H, W] with N >= 1, got {tuple(x.shape)}")
    if int(x.max()) >= levels:
        raise ValueError(f"{name} has value {int(x.max())}, outside the {levels} levels 0..{levels - 1}")


def fit_gaussian(train: Tensor, *, levels: int, centered: bool = True,
                 generator=None) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood (μ [D], Σ [D, D]) float64 of the uniformly dequantized training images in
    model space, with the ridge ``RIDGE`` · w²/12 on the diagonal. Needs N >= D + 1 images."""
    levels = check_levels(levels)
    _check_images(train, levels, "train")
    n, dim = train.shape[0], train[0].numel()
    if n < dim + 1:
        raise ValueError(f"train: a full-covariance Gaussian in D = {dim} dimensions needs at least "
                         f"D + 1 = {dim + 1} training images, got {n}")
    y, _ = dequantization_draws(train, centered=centered, generator=generator, levels=levels)
    y = y[0].reshape(n, dim).double()
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / n
    width = (2.0 if centered else 1.0) / levels
    cov += torch.eye(dim, dtype=torch.float64) * (RIDGE * width**2 / 12)
    return mu, cov


def gaussian_bits_per_dim(train: Tensor, test: Tensor, *, levels: int, centered: bool = True,
                          generator=None, num_importance: int = 1) -> dict:
    """Bits/dim of ``test`` under the full-covariance Gaussian fitted to dequantized ``train``.

    ``generator`` draws first the training dequantization noise, then the test one. Returns
    {'bpd': [N] float64, 'mean', 'se', 'n', 'dim'} (bits per sub-pixel)."""
    levels = check_levels(levels)
    _check_images(test, levels, "test")
    _check_images(train, levels, "train")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train and test images differ in shape: {tuple(train.shape[1:])} vs "
                         f"{tuple(test.shape[1:])}")
    mu, cov = fit_gaussian(train, levels=levels, centered=centered, generator=generator)
    gauss = torch.distributions.MultivariateNormal(mu, scale_tril=torch.linalg.cholesky(cov))

    def log_prob(y: Tensor) -> Tensor:
        return gauss.log_prob(y.reshape(len(y), -1).double())

    bpd = bits_per_dim(log_prob, test, centered=centered, generator=generator, dequantization="uniform",
                       num_importance=num_importance, levels=levels).bpd
    mean, se = mean_se(bpd)
    return {"bpd": bpd, "mean": mean, "se": se, "n": len(test), "dim": mu.numel()}


def _tile(images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """[N, C, H, W] → one [rows·H, cols·W, C] picture, cols = ⌈√N⌉, rows = ⌈N/cols⌉, row-major,
    the unused cells of the last row filled with zeros."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, c, h, w), dtype=np.uint8)
    grid[:n] = images
    picture = grid.reshape(rows, cols, c, h, w).transpose(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return picture, (rows, cols)


def codec_bits_per_subpixel(images: Tensor, *, levels: int, codec: str) -> dict:
    """Bits per sub-pixel of ``images`` (uint8 [N, C, H, W], C = 1 or 3) stored losslessly by Pillow.

    The N images are tiled into one near-square picture (cols = ⌈√N⌉, rows = ⌈N/cols⌉, no gaps);
    the cells of the last row left over are zero images, encoded but not counted in N·C·H·W. Pixels
    hold the raw levels k, not rescaled to 0..255: the codec sees exactly the information in the data
    (a rescaling is a bijection, but it would change what the codec's predictors and entropy coder
    see). PNG: optimize, compress_level 9; WebP: lossless, quality 100, method 6. The count is
    8 · file bytes / (N·C·H·W) and includes the file headers. The file must decode back exactly
    (RuntimeError otherwise). Returns {'bits_per_subpixel', 'bytes', 'n', 'codec', 'tile'}."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {list(CODECS)}, got {codec!r}")
    levels = check_levels(levels)
    _check_images(images, levels, "images")
    n, c, h, w = images.shape
    if c not in _MODES:
        raise ValueError(f"images must have C = 1 (grey) or 3 (RGB) channels, got C = {c}")
    picture, tile = _tile(images.cpu().numpy())
    if codec == "webp" and max(picture.shape[:2]) > _WEBP_MAX_SIDE:
        raise ValueError(f"the tiled picture {picture.shape[:2]} exceeds WebP's {_WEBP_MAX_SIDE} pixels a side")
    pixels = picture[..., 0] if c == 1 else picture
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, **_SAVE[codec])
    data = buffer.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if not np.array_equal(decoded, np.broadcast_to(picture, decoded.shape)):
        raise RuntimeError(f"{codec} did not reproduce the images exactly: it is not lossless here")
    return {"bits_per_subpixel": 8 * len(data) / (n * c * h * w), "bytes": len(data), "n": n,
            "codec": codec, "tile": tile}


def reference_rows(train: Tensor, test: Tensor, *, levels: int, centered: bool = True,
                   seed: int = 0) -> list[dict]:
    """[Gaussian, PNG, WebP] rows {'name', 'bpd', 'se', 'note'} for ``test`` (bits per sub-pixel);
    the codecs are one number for the whole set, so their 'se' is None."""
    gauss = gaussian_bits_per_dim(train, test, levels=levels, centered=centered,
                                  generator=torch.Generator().manual_seed(seed))
    rows = [{"name": "full-covariance Gaussian", "bpd": gauss["mean"], "se": gauss["se"],
             "note": f"fitted to {len(train)} uniformly dequantized training images, D = {gauss['dim']}"}]
    for codec, name in (("png", "PNG (lossless, tiled)"), ("webp", "WebP lossless (tiled)")):
        out = codec_bits_per_subpixel(test, levels=levels, codec=codec)
        rows.append({"name": name, "bpd": out["bits_per_subpixel"], "se": None,
                     "note": f"{out['bytes']} bytes incl. headers, {out['tile'][0]}x{out['tile'][1]} tiles"})
    return rows
