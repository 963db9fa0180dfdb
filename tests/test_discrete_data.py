"""DiscreteDataModule (8-bit data with exact entropy) and its exact scores (GitHub issue 12)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hosm_lightning.core import VESDE, VPSDE, GaussianMixture
from hosm_lightning.data import DiscreteDataModule, QuantizedMarginal
from hosm_lightning.data.discrete import MARGINALS


def test_quantized_probabilities_are_cdf_differences_and_entropy_is_exact():
    means, stds, w = MARGINALS[2]
    m = QuantizedMarginal(means, stds, w)
    edges = (np.arange(257) - 0.5) / 255
    cdf = sum(wi * stats.norm.cdf(edges, mu, s) for mu, s, wi in zip(means, stds, w))
    cdf[0], cdf[-1] = 0.0, 1.0
    np.testing.assert_allclose(m.probs.numpy(), np.diff(cdf), atol=1e-15)
    assert abs(m.probs.sum().item() - 1) < 1e-12
    p = np.diff(cdf)
    p = p[p > 0]
    assert abs(m.entropy_bits - float(-(p * np.log2(p)).sum())) < 1e-10


@pytest.mark.parametrize("shape,sample_shape", [("1d", (1,)), ("2d", (2,)), ("image", (3, 8, 8))])
def test_batches_dtypes_shapes_and_ranges(shape, sample_shape):
    dm = DiscreteDataModule(shape=shape, batch_size=8, eval_batch_size=5, steps_per_epoch=2, val_size=7, test_size=9)
    dm.setup()
    train = list(dm.train_dataloader())
    assert len(train) == 2 and train[0].shape == (8, *sample_shape) and train[0].dtype == torch.float32
    k = torch.round((train[0] + 1) / 2 * 255)  # centered: on the grid 2k/255 - 1
    assert torch.allclose(train[0], 2 * k / 255 - 1, atol=1e-6) and not torch.equal(train[0], train[1])
    test = torch.cat(list(dm.test_dataloader()))
    assert test.dtype == torch.uint8 and test.shape == (9, *sample_shape)
    assert torch.cat(list(dm.val_dataloader())).shape == (7, *sample_shape)
    assert dm.dim == math.prod(sample_shape) and dm.entropy == dm.entropy_bits
    assert (dm.image_shape == sample_shape) if shape == "image" else not hasattr(dm, "image_shape")
    again = DiscreteDataModule(shape=shape, val_size=7, test_size=9)
    again.setup()
    assert torch.equal(torch.cat(list(again.test_dataloader())), test)  # fixed test set
    uncentered = DiscreteDataModule(shape=shape, centered=False, batch_size=8, steps_per_epoch=1)
    assert next(iter(uncentered.train_dataloader())).min() >= 0


def test_sample_frequencies_match_p_and_entropy_is_mean_code_length():
    dm = DiscreteDataModule(shape="image")
    k = dm.sample_bytes(4000, torch.Generator().manual_seed(0))
    dist = dm.distribution
    code = -dist.log_prob_bytes(k) / (dm.dim * math.log(2))
    assert abs(code.mean().item() - dm.entropy_bits) < 4 * code.std().item() / math.sqrt(len(code))
    counts = torch.bincount(k[:, 0].flatten().long(), minlength=256).double()  # channel 0 pixels: marginal 0
    expected = dist.probs[0] * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected.clamp_min(1e-9))[expected > 5].sum().item()
    assert chi2 < stats.chi2.ppf(0.999, int((expected > 5).sum()) - 1)


@pytest.mark.parametrize("kind", ["discrete", "smooth"])
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_product_of_1d_mixtures_equals_the_joint_mixture(kind, sde):
    """2-D: the product-of-marginals density and score equal a brute-force joint GaussianMixture
    (256² point-mass components for the discrete kind) at t > 0."""
    dm = DiscreteDataModule(shape="2d", kind=kind)
    dist = dm.distribution
    g = dist.grid()
    if kind == "discrete":
        p0, p1 = dist.probs[0], dist.probs[2]
        means = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        weights = (p0[:, None] * p1[None, :]).reshape(-1)
        keep = weights > 0
        joint = GaussianMixture(means[keep], torch.full((int(keep.sum()), 2), 1e-300, dtype=torch.float64), weights[keep])
    else:
        comps = []
        for m in (0, 2):
            logw, mu, var = dist._components(m)
            comps.append((logw.exp(), mu, var))
        (w0, m0, v0), (w1, m1, v1) = comps
        means = torch.stack(torch.meshgrid(m0, m1, indexing="ij"), -1).reshape(-1, 2)
        var = torch.stack(torch.meshgrid(v0, v1, indexing="ij"), -1).reshape(-1, 2)
        joint = GaussianMixture(means, var, (w0[:, None] * w1[None, :]).reshape(-1))
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.6 - 0.8
    for t in (1e-3, 0.05, 0.5):
        torch.testing.assert_close(dist.log_prob(x, t, sde), joint.log_prob(x, t, sde), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dist.score(x, t, sde), joint.score(x, t, sde), rtol=1e-7, atol=1e-7)


def test_exact_score_is_the_gradient_of_log_q_and_handles_chunks():
    dm = DiscreteDataModule(shape="image", kind="discrete")
    dist, sde = dm.distribution, VPSDE()
    x = (torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1).requires_grad_()
    t = torch.tensor([1e-4, 1e-2, 0.3], dtype=torch.float64)
    (grad,) = torch.autograd.grad(dist.log_prob(x, t, sde).sum(), x)
    torch.testing.assert_close(dist.score_fn(sde)(x.detach(), t), grad, rtol=1e-6, atol=1e-6)
    import hosm_lightning.data.discrete as mod

    # the closed-form diagonal derivative that score_fn's backward uses = autograd's second derivative
    xs = x.detach().clone().requires_grad_()
    (diag,) = torch.autograd.grad(dist.score_fn(sde)(xs, t).sum(), xs)
    xr = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(dist.log_prob(xr, t, sde).sum(), xr, create_graph=True)
    (ref,) = torch.autograd.grad(g.sum(), xr)  # Jacobian is diagonal: column sums = diagonal
    torch.testing.assert_close(diag, ref, rtol=1e-6, atol=1e-6)
    full = dist.log_prob(x.detach(), t, sde)
    old = mod._CHUNK
    mod._CHUNK = 1000  # forces one sample per chunk
    try:
        torch.testing.assert_close(dist.log_prob(x.detach(), t, sde), full)
        torch.testing.assert_close(dist.score(x.detach(), t, sde), grad, rtol=1e-6, atol=1e-6)
    finally:
        mod._CHUNK = old


def test_smooth_kind_at_t0_is_the_base_density_and_discrete_kind_refuses():
    dm = DiscreteDataModule(shape="1d", kind="smooth", centered=False)
    means, stds, w = MARGINALS[2]
    y = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)[:, None]
    ref = np.log(sum(wi * stats.norm.pdf(y.numpy(), mu, s) for mu, s, wi in zip(means, stds, w))).squeeze(1)
    np.testing.assert_allclose(dm.distribution.log_prob(y).numpy(), ref, rtol=1e-10)
    with pytest.raises(ValueError, match="t > 0"):
        DiscreteDataModule(shape="1d").distribution.log_prob(y)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        DiscreteDataModule(shape="3d")
    with pytest.raises(ValueError, match="kind"):
        DiscreteDataModule(kind="continuous")
    with pytest.raises(ValueError, match="batch_size"):
        DiscreteDataModule(batch_size=0)
    with pytest.raises(ValueError, match="dimensions"):
        DiscreteDataModule(shape="2d").distribution.log_prob(torch.zeros(2, 3), 0.1, VPSDE())


def test_eval_loaders_shard_each_point_once_under_ddp():
    """Val/test of 8-bit data under 2 ranks: disjoint shards that cover every point once (no sampler
    padding that would count points twice in validation means), uint8 rows as they are."""
    from types import SimpleNamespace

    dm = DiscreteDataModule(shape="1d", val_size=7, test_size=5, eval_batch_size=3)
    dm.setup()
    for loader_name, data in (("val_dataloader", dm._val), ("test_dataloader", dm._test)):
        seen = []
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            batches = list(getattr(dm, loader_name)())
            assert all(b.dtype == torch.uint8 for b in batches)
            seen.append(torch.cat(batches))
        assert len(seen[0]) + len(seen[1]) == len(data)  # nothing repeated
        assert torch.equal(torch.cat([seen[0], seen[1]]).sort(0).values, data.sort(0).values)
