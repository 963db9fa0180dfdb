"""Reference bits/dim rows (hosm_lightning/baselines.py): the full-covariance Gaussian against scipy and
closed-form Gaussian entropies, the lossless codecs against exact decoding and entropy bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from hosm_lightning.baselines import (
    RIDGE,
    codec_bits_per_subpixel,
    fit_gaussian,
    gaussian_bits_per_dim,
    reference_rows,
)


def _levels(values, shape) -> torch.Tensor:
    return torch.tensor(np.array(values).reshape(shape), dtype=torch.uint8)


def _discretized_gaussian(rng, n, shape, mean, std, levels):
    """i.i.d. pixels round(mean + std·z) clipped to 0..L−1, and their exact variance (from the pmf)."""
    k = np.clip(np.round(mean + std * rng.standard_normal((n, *shape))), 0, levels - 1)
    edges = np.arange(levels + 1) - 0.5
    edges[0], edges[-1] = -np.inf, np.inf
    pmf = np.diff(stats.norm.cdf(edges, mean, std))
    grid = np.arange(levels)
    var = pmf @ grid**2 - (pmf @ grid) ** 2
    return _levels(k, (n, *shape)), var


def _gaussian_bpd(cov_levels: np.ndarray) -> float:
    """Bits/dim of data under their own Gaussian (its entropy): ½ log₂ det(2πe Σ)/D + log₂ L, Σ in [0, 1]
    units, = ½ log₂ det(2πe Σ_levels)/D with Σ_levels = L² Σ in level units."""
    dim = len(cov_levels)
    _, logdet = np.linalg.slogdet(2 * math.pi * math.e * cov_levels)
    return logdet / (2 * dim * math.log(2))


# ---------------------------------------------------------------- Gaussian


@pytest.mark.parametrize("centered", [False, True])
def test_gaussian_matches_scipy_on_the_training_set(centered):
    levels, n, shape, seed = 17, 120, (1, 3, 4), 3
    rng = np.random.default_rng(0)
    base = rng.integers(0, levels, (n, 1, 1, 1))
    train = _levels(np.clip(base + rng.integers(-2, 3, (n, *shape)), 0, levels - 1), (n, *shape))
    out = gaussian_bits_per_dim(train, train, levels=levels, centered=centered,
                                generator=torch.Generator().manual_seed(seed))

    # the same draws, in the same order: the fit's noise, then the evaluation's
    g = torch.Generator().manual_seed(seed)
    u_fit, u_eval = (torch.rand((1, *train.shape), generator=g)[0].reshape(n, -1).double().numpy()
                     for _ in range(2))
    k = train.reshape(n, -1).double().numpy()
    scale, shift, offset = (2.0, 1.0, math.log2(levels / 2)) if centered else (1.0, 0.0, math.log2(levels))
    y_fit, y_eval = (scale * (k + u) / levels - shift for u in (u_fit, u_eval))
    dim = y_fit.shape[1]
    mu = y_fit.mean(0)
    cov = np.cov(y_fit, rowvar=False, bias=True) + np.eye(dim) * RIDGE * (scale / levels) ** 2 / 12
    expected = -stats.multivariate_normal(mu, cov).logpdf(y_eval) / (dim * math.log(2)) + offset

    assert out["n"] == n and out["dim"] == dim and out["bpd"].dtype == torch.float64
    np.testing.assert_allclose(out["bpd"].numpy(), expected, rtol=0, atol=2e-5)
    assert out["mean"] == pytest.approx(expected.mean(), abs=2e-5)
    assert out["se"] == pytest.approx(expected.std(ddof=1) / math.sqrt(n), rel=1e-3)


def test_centering_does_not_change_the_bits_per_dim():
    rng = np.random.default_rng(1)
    train, _ = _discretized_gaussian(rng, 200, (1, 2, 3), 100, 30, 256)
    test, _ = _discretized_gaussian(rng, 50, (1, 2, 3), 100, 30, 256)
    a, b = (gaussian_bits_per_dim(train, test, levels=256, centered=c, generator=torch.Generator().manual_seed(5))
            for c in (False, True))
    torch.testing.assert_close(a["bpd"], b["bpd"], rtol=0, atol=1e-4)


def test_iid_discretized_gaussian_reaches_the_gaussian_entropy():
    levels, std, shape = 256, 20.0, (1, 4, 4)
    rng = np.random.default_rng(2)
    train, var_k = _discretized_gaussian(rng, 3000, shape, 127.5, std, levels)
    test, _ = _discretized_gaussian(rng, 3000, shape, 127.5, std, levels)
    dim = math.prod(shape)
    # y·L = k + u: variance Var k + 1/12 per pixel, no correlation
    closed_form = _gaussian_bpd(np.eye(dim) * (var_k + 1 / 12))
    _, cov = fit_gaussian(train, levels=levels, centered=False, generator=torch.Generator().manual_seed(0))
    fitted = _gaussian_bpd(cov.numpy() * levels**2)
    out = gaussian_bits_per_dim(train, test, levels=levels, centered=False,
                                generator=torch.Generator().manual_seed(0))
    assert fitted == pytest.approx(closed_form, abs=0.02)
    assert out["mean"] == pytest.approx(fitted, abs=0.03)
    assert out["mean"] == pytest.approx(closed_form, abs=0.03)
    assert out["se"] < 0.01


def test_correlated_pixels_cost_far_less_than_iid_pixels():
    levels, n, shape = 256, 1000, (1, 4, 4)
    dim = math.prod(shape)
    rng = np.random.default_rng(3)
    constant = _levels(np.broadcast_to(rng.integers(0, levels, (2 * n, 1, 1, 1)), (2 * n, *shape)), (2 * n, *shape))
    iid = _levels(rng.integers(0, levels, (2 * n, *shape)), (2 * n, *shape))
    gen = torch.Generator().manual_seed(0)
    corr = gaussian_bits_per_dim(constant[:n], constant[n:], levels=levels, generator=gen)["mean"]
    free = gaussian_bits_per_dim(iid[:n], iid[n:], levels=levels, generator=gen)["mean"]
    # level units: Σ = Var(k)·11ᵀ + I/12 for constant images, (Var(k) + 1/12)·I for i.i.d. pixels
    var_k = (levels**2 - 1) / 12
    assert corr == pytest.approx(_gaussian_bpd(var_k * np.ones((dim, dim)) + np.eye(dim) / 12), abs=0.05)
    assert free == pytest.approx(_gaussian_bpd(np.eye(dim) * (var_k + 1 / 12)), abs=0.05)
    assert corr < 1.0 and free > 7.5


@pytest.mark.parametrize(("train", "test", "match"), [
    (torch.zeros(40, 1, 2, 2), torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "uint8"),
    (torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, 1, 2, 2, dtype=torch.int64), "uint8"),
    (torch.full((40, 1, 2, 2), 17, dtype=torch.uint8), torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "17 levels"),
    (torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "at least"),
    (torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, 1, 2, 3, dtype=torch.uint8), "differ in shape"),
])
def test_gaussian_rejects_bad_input(train, test, match):
    with pytest.raises(ValueError, match=match):
        gaussian_bits_per_dim(train, test, levels=17)


# ---------------------------------------------------------------- codecs


@pytest.mark.parametrize("codec", ["png", "webp"])
@pytest.mark.parametrize(("n", "channels", "tile"), [(10, 1, (3, 4)), (9, 3, (3, 3))])
def test_codec_decodes_to_the_tiled_images(monkeypatch, codec, n, channels, tile):
    images = torch.randint(0, 17, (n, channels, 5, 7), dtype=torch.uint8)
    decoded = []
    open_image = Image.open

    def spy(fp):
        image = open_image(fp)
        decoded.append(np.asarray(image.convert("RGB")))
        return image

    monkeypatch.setattr(Image, "open", spy)
    out = codec_bits_per_subpixel(images, levels=17, codec=codec)
    assert out["tile"] == tile and out["n"] == n and out["codec"] == codec
    assert out["bits_per_subpixel"] == 8 * out["bytes"] / images.numel()
    rows, cols = tile
    expected = np.zeros((rows * 5, cols * 7, 3), dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        r, c = divmod(i, cols)
        expected[r * 5:(r + 1) * 5, c * 7:(c + 1) * 7] = image.transpose(1, 2, 0)
    assert len(decoded) == 1
    np.testing.assert_array_equal(decoded[0], expected)


def test_codec_refuses_a_lossy_round_trip(monkeypatch):
    open_image = Image.open

    def corrupt(fp):
        arr = np.asarray(open_image(fp).convert("L")).copy()
        arr[0, 0] ^= 1
        return Image.fromarray(arr)

    monkeypatch.setattr(Image, "open", corrupt)
    with pytest.raises(RuntimeError, match="exactly"):
        codec_bits_per_subpixel(torch.zeros(4, 1, 3, 3, dtype=torch.uint8), levels=2, codec="png")


@pytest.mark.parametrize("codec", ["png", "webp"])
def test_constant_images_compress_far_below_one_bit(codec):
    images = torch.full((64, 3, 8, 8), 9, dtype=torch.uint8)
    assert codec_bits_per_subpixel(images, levels=17, codec=codec)["bits_per_subpixel"] < 0.2


def test_random_bytes_are_incompressible_for_png():
    images = torch.randint(0, 256, (256, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert codec_bits_per_subpixel(images, levels=256, codec="png")["bits_per_subpixel"] >= 7.9


@pytest.mark.parametrize("codec", ["png", "webp"])
def test_random_levels_cannot_beat_their_entropy(codec):
    images = torch.randint(0, 17, (64, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bits = codec_bits_per_subpixel(images, levels=17, codec=codec)["bits_per_subpixel"]
    assert 4.0 <= bits < 8.0  # log2 17 = 4.09 bits of information, stored in 8-bit pixels


@pytest.mark.parametrize(("images", "codec", "match"), [
    (torch.zeros(4, 1, 3, 3, dtype=torch.uint8), "jpeg", "codec"),
    (torch.zeros(4, 2, 3, 3, dtype=torch.uint8), "png", "C = 2"),
    (torch.full((4, 1, 3, 3), 17, dtype=torch.uint8), "png", "17 levels"),
    (torch.zeros(4, 1, 3, 3), "webp", "uint8"),
    (np.zeros((4, 1, 3, 3), dtype=np.uint8), "png", "uint8"),
])
def test_codec_rejects_bad_input(images, codec, match):
    with pytest.raises(ValueError, match=match):
        codec_bits_per_subpixel(images, levels=17, codec=codec)


# ---------------------------------------------------------------- rows


def test_reference_rows():
    rng = np.random.default_rng(4)
    train, _ = _discretized_gaussian(rng, 100, (1, 3, 3), 8, 3, 17)
    test, _ = _discretized_gaussian(rng, 30, (1, 3, 3), 8, 3, 17)
    rows = reference_rows(train, test, levels=17, seed=7)
    assert [r["name"] for r in rows] == ["full-covariance Gaussian", "PNG (lossless, tiled)", "WebP lossless (tiled)"]
    gauss = gaussian_bits_per_dim(train, test, levels=17, generator=torch.Generator().manual_seed(7))
    assert rows[0]["bpd"] == gauss["mean"] and rows[0]["se"] == gauss["se"]
    for row, codec in zip(rows[1:], ("png", "webp"), strict=True):
        assert row["bpd"] == codec_bits_per_subpixel(test, levels=17, codec=codec)["bits_per_subpixel"]
        assert row["se"] is None
    assert all(isinstance(r["note"], str) and r["note"] for r in rows)
