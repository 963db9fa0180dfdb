"""Bits/dim of 8-bit data: uniform and truncated-normal dequantization (core/dequantization.py;
docs/design.md §4, eqs. 4.2 and 4.4).

Anchors: the bin edges of the uniform draws; scipy's truncnorm for log q; closed-form bounds for a
Gaussian model; uniform models of 8- and 7-bit bytes; exact discrete entropies of the tests' discrete
data (data/discrete.py) under the exact density at eps and under the ODE of the exact score.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import pixel_mixtures
from scipy import stats

from hosm_lightning.core import (
    VESDE,
    VPSDE,
    ODEOptions,
    SubVPSDE,
    bits_per_dim,
    dequantization_draws,
    importance_bound,
    ode_log_likelihood,
    truncnorm_log_prob,
)
from hosm_lightning.core.dequantization import resolve_protocol
from hosm_lightning.data import DiscreteDataModule

LN2 = math.log(2)
SDES = {"vp": (VPSDE, True), "subvp": (SubVPSDE, True), "ve": (VESDE, False)}


def _bytes(n, d=3, seed=0):
    return torch.randint(0, 256, (n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _gauss(m, s):
    return lambda y: torch.distributions.Normal(m, s).log_prob(y.double()).flatten(1).sum(1)


def _discrete(shape, kind, n, **kw):
    """Bytes of the tests' discrete data with an exact entropy, and their distribution."""
    dm = DiscreteDataModule(shape=shape, kind=kind, **kw)
    return dm.sample_bytes(n, torch.Generator().manual_seed(2)), dm.distribution, dm.entropy_bits


def _exact_logp(dist, sde, eps):
    return lambda y: dist.log_prob(y.double(), eps, sde)


# -- the uniform draws ------------------------------------------------------------------------------
def test_uniform_draws_fill_the_bins():
    g = torch.Generator().manual_seed(9)
    k = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    y, log_q = dequantization_draws(k, centered=False, generator=torch.Generator().manual_seed(10))
    assert y.shape == (1, *k.shape) and y.dtype == torch.float32 and log_q.shape == (1, 64)
    kf = k.double()
    assert (y[0].double() >= kf / 256).all() and (y[0].double() < (kf + 1) / 256).all()
    u = y[0].double() * 256 - kf
    assert abs(u.mean().item() - 0.5) < 0.01  # uniform within the bin
    assert abs(u.var().item() - 1 / 12) < 0.005
    torch.testing.assert_close(log_q, torch.full((1, 64), 192 * math.log(256), dtype=torch.float64), rtol=0, atol=0)
    # floats k/255 are the same bytes; another seed gives other draws
    y_float, _ = dequantization_draws(k.float() / 255, centered=False, generator=torch.Generator().manual_seed(10))
    assert torch.equal(y, y_float)
    assert not torch.equal(y, dequantization_draws(k, centered=False, generator=torch.Generator().manual_seed(11))[0])
    # [-1, 1]: the same draws mapped by y ↦ 2y − 1, bins of width 2/256 (log q = D log 128)
    y11, log_q11 = dequantization_draws(k, centered=True, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(y11, 2 * y - 1, rtol=0, atol=0)
    torch.testing.assert_close(log_q11, torch.full((1, 64), 192 * math.log(128), dtype=torch.float64), rtol=0, atol=0)


def test_uniform_draws_stay_below_the_upper_bin_edge_in_float32():
    # (k + u) / 256 in float32 rounds up to (k + 1) / 256 for u > 1 - 2^-17 when k >= 128
    k = torch.full((4, 500_000), 255, dtype=torch.uint8)
    y, _ = dequantization_draws(k, centered=False, generator=torch.Generator().manual_seed(12))
    assert (y < 1.0).all(), int((y >= 1.0).sum())
    assert (y >= 255 / 256).all()


# -- the truncated normal ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
def test_truncated_normal_log_q_matches_scipy_and_stays_in_the_bin(name):
    cls, centered = SDES[name]
    sde, eps = cls(), 1e-3 if name != "subvp" else 1e-2
    x = _bytes(50)
    y, log_q = dequantization_draws(x, centered=centered, dequantization="truncated_normal", num_importance=3,
                                    sde=sde, eps=eps, generator=torch.Generator().manual_seed(1))
    assert y.shape == (3, 50, 3) and log_q.shape == (3, 50)
    a, sigma = (float(c) for c in sde.marginal(torch.tensor([eps], dtype=torch.float64)))
    centre = (2 * x.double() / 255 - 1) if centered else x.double() / 255
    half = (1.0 if centered else 0.5) / 255
    assert ((y.double() / a - centre).abs() <= half * (1 + 1e-5) + 1e-7).all()  # x_eps / a stays in the bin
    tau = a * half / sigma
    ref = stats.truncnorm.logpdf(y.double().numpy(), -tau, tau, loc=(a * centre).numpy(), scale=sigma).sum(-1)
    np.testing.assert_allclose(log_q.numpy(), ref, rtol=1e-6, atol=1e-6)
    # the truncated normal really is one: second moment E n² = 1 − 2τφ(τ)/Z
    n = ((y.double() - a * centre) / sigma).flatten()
    z = math.erf(tau / math.sqrt(2))
    m2 = 1 - 2 * tau * math.exp(-tau * tau / 2) / math.sqrt(2 * math.pi) / z
    assert abs(n.pow(2).mean().item() - m2) < 5 * n.pow(2).std().item() / math.sqrt(n.numel())


def test_truncated_normal_eps_none_is_the_sde_default():
    x, sde = _bytes(8), SubVPSDE()
    draw = lambda eps: dequantization_draws(x, centered=True, dequantization="tn", sde=sde, eps=eps,  # noqa: E731
                                            generator=torch.Generator().manual_seed(3))
    (y, lq), (y_def, lq_def), (y_other, _) = draw(None), draw(SubVPSDE.default_eps), draw(1e-3)
    assert torch.equal(y, y_def) and torch.equal(lq, lq_def) and not torch.equal(y, y_other)


def test_truncnorm_log_prob_outside_is_minus_inf():
    out = truncnorm_log_prob(torch.tensor([[0.5, 2.1], [0.1, -0.2]], dtype=torch.float64), tau=2.0, sigma=0.1)
    assert out[0] == -math.inf and torch.isfinite(out[1])
    ref = stats.truncnorm.logpdf(np.array([0.1, -0.2]) * 0.1, -2.0, 2.0, scale=0.1).sum()
    assert out[1].item() == pytest.approx(ref, rel=1e-10)


# -- the bound and bits/dim -------------------------------------------------------------------------
@pytest.mark.parametrize("centered", [False, True])
def test_bound_of_a_gaussian_model_is_the_closed_form(centered):
    """p_eps = N(m, s²) per dimension: E_q[log p − log q] in closed form (K = 1), both protocols."""
    sde, eps, m, s = VPSDE(), 1e-4, 0.1, 0.3
    k = torch.full((20000, 1), 140, dtype=torch.uint8)
    for proto in ("uniform", "truncated_normal"):
        out = bits_per_dim(_gauss(m, s), k, centered=centered, dequantization=proto, sde=sde, eps=eps,
                           generator=torch.Generator().manual_seed(2))
        if proto == "uniform":
            lo = 140 / 256
            w = 1 / 256
            c, var = lo + w / 2, w * w / 12
            c, var, logq = (2 * c - 1, 4 * var, math.log(128)) if centered else (c, var, math.log(256))
            exact = -0.5 * math.log(2 * math.pi * s * s) - ((c - m) ** 2 + var) / (2 * s * s) - logq
        else:
            a, sig = (float(v) for v in sde.marginal(torch.tensor([eps], dtype=torch.float64)))
            xb = 2 * 140 / 255 - 1 if centered else 140 / 255
            tau = a * (1.0 if centered else 0.5) / 255 / sig
            z = math.erf(tau / math.sqrt(2))
            en2 = 1 - 2 * tau * math.exp(-tau * tau / 2) / math.sqrt(2 * math.pi) / z
            e_logp = -0.5 * math.log(2 * math.pi * s * s) - ((a * xb - m) ** 2 + sig * sig * en2) / (2 * s * s)
            e_logq = -0.5 * en2 - 0.5 * math.log(2 * math.pi) - math.log(sig) - math.log(z)
            exact = e_logp - e_logq
        b = out.bound
        assert out.protocol == proto and out.num_importance == 1
        assert abs(b.mean().item() - exact) < 5 * b.std().item() / math.sqrt(len(b)) + 1e-9, (proto, b.mean(), exact)
        torch.testing.assert_close(out.bpd, -b / LN2, rtol=0, atol=0)  # bpd = −bound / (D ln 2), D = 1


@pytest.mark.parametrize("centered", [False, True])
def test_uniform_k1_is_minus_log_p_over_d_ln2_plus_8_or_7(centered):
    """Eq. 4.2: bpd = −log p(y)/(D ln 2) + 8 for data in [0, 1], + 7 in [−1, 1], at the dequantized y."""
    x = _bytes(64, d=4, seed=3)
    fn = _gauss(0.0, 0.5)
    out = bits_per_dim(fn, x, centered=centered, generator=torch.Generator().manual_seed(4))
    y, _ = dequantization_draws(x, centered=centered, generator=torch.Generator().manual_seed(4))
    expected = -fn(y[0]) / (4 * LN2) + (7 if centered else 8)
    torch.testing.assert_close(out.bpd, expected, rtol=0, atol=1e-12)


def test_importance_weighting_is_log_mean_exp():
    x = _bytes(64, d=4, seed=3)
    fn = _gauss(0.0, 0.5)
    one = bits_per_dim(fn, x, centered=True, generator=torch.Generator().manual_seed(4))
    eight = bits_per_dim(fn, x, centered=True, num_importance=8, generator=torch.Generator().manual_seed(4))
    lw = eight.log_w
    assert lw.shape == (8, 64) and one.log_w.shape == (1, 64) and eight.num_importance == 8
    torch.testing.assert_close(eight.bound, torch.logsumexp(lw, 0) - math.log(8))
    torch.testing.assert_close(eight.bpd, -eight.bound / (4 * LN2), rtol=0, atol=0)  # one formula for every K
    assert (eight.bound >= lw.mean(0) - 1e-12).all()  # Jensen, per sample
    assert (eight.bound > lw.mean(0) + 1e-6).any()
    torch.testing.assert_close(importance_bound(lw[:1], torch.zeros(1, 64)), lw[0])
    # the first of the 8 draws is the K = 1 draw of the same generator
    torch.testing.assert_close(lw[0], one.log_w[0])
    torch.testing.assert_close(one.bound, one.log_w[0])


@pytest.mark.parametrize("proto", ["uniform", "tn"])
def test_per_sample_generators_do_not_depend_on_the_batch(proto):
    x = _bytes(6, seed=5)
    sde = VPSDE()
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]  # noqa: E731
    y, lq = dequantization_draws(x, centered=True, dequantization=proto, num_importance=2, sde=sde, eps=1e-5,
                                 generator=gens())
    y2, lq2 = dequantization_draws(x[2:3], centered=True, dequantization=proto, num_importance=2, sde=sde, eps=1e-5,
                                   generator=gens()[2:3])
    torch.testing.assert_close(y[:, 2:3], y2)
    torch.testing.assert_close(lq[:, 2:3], lq2)
    y3, _ = dequantization_draws(x[2:3], centered=True, dequantization=proto, num_importance=2, sde=sde, eps=1e-5,
                                 generator=gens()[3:4])
    assert not torch.equal(y2, y3)


def _uniform_logp(lo, hi):
    """Log-density of the uniform distribution on [lo, hi)^D, -inf outside."""

    def fn(y):
        d = y[0].numel()
        inside = ((y >= lo) & (y < hi)).flatten(1).all(1)
        val = torch.full((y.shape[0],), -d * math.log(hi - lo), dtype=torch.float64)
        return torch.where(inside, val, torch.full_like(val, -math.inf))

    return fn


@pytest.mark.parametrize("centered", [False, True])
def test_bpd_of_uniform_bytes_under_the_uniform_model_is_8_bits(centered):
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 256, (32, 3, 4, 4), generator=g, dtype=torch.uint8)
    fn = _uniform_logp(-1.0, 1.0) if centered else _uniform_logp(0.0, 1.0)
    out = bits_per_dim(fn, x, centered=centered, generator=torch.Generator().manual_seed(14))
    assert out.bpd.shape == (32,)
    torch.testing.assert_close(out.bpd, torch.full((32,), 8.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert torch.isfinite(out.log_w).all()  # every dequantized point landed in the model's domain


@pytest.mark.parametrize("centered", [False, True])
def test_bpd_of_seven_bit_bytes(centered):
    g = torch.Generator().manual_seed(15)
    x = torch.randint(0, 128, (32, 3, 4, 4), generator=g, dtype=torch.uint8)
    # uniform on [0, 0.5)^D in [0,1] space (density 2^D), i.e. on [-1, 0)^D in [-1,1] space (density 1)
    fn = _uniform_logp(-1.0, 0.0) if centered else _uniform_logp(0.0, 0.5)
    out = bits_per_dim(fn, x.float() / 255, centered=centered, generator=torch.Generator().manual_seed(16))
    torch.testing.assert_close(out.bpd, torch.full((32,), 7.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert torch.isfinite(out.log_w).all()


def test_bpd_of_an_exact_density_does_not_depend_on_the_convention():
    """A 4-D mixture in [0,1] space (images [B,1,2,2]) and the same model pushed to [-1,1] by y ↦ 2y-1."""
    mix01, mix11 = pixel_mixtures()
    y = mix01.sample(256, generator=torch.Generator().manual_seed(17), dtype=torch.float64).clamp(0, 1)
    x = torch.round(y * 255).to(torch.uint8).reshape(256, 1, 2, 2)

    def exact(mix):
        return lambda pts: mix.log_prob(pts.double().flatten(1))

    b01 = bits_per_dim(exact(mix01), x, centered=False, generator=torch.Generator().manual_seed(18)).bpd
    b11 = bits_per_dim(exact(mix11), x, centered=True, generator=torch.Generator().manual_seed(18)).bpd
    torch.testing.assert_close(b01, b11, rtol=0, atol=1e-5)
    assert torch.isfinite(b01).all()
    # the offset matters: the [0,1] offset (log q = D log 256) with the centered model's density is 1 bit off
    pts, _ = dequantization_draws(x, centered=True, generator=torch.Generator().manual_seed(18))
    wrong = -(mix11.log_prob(pts[0].double().flatten(1)) - 4 * math.log(256)) / (4 * LN2)
    assert (wrong - b01).abs().min() > 0.99


# -- bounds on the exact entropy of discrete data ---------------------------------------------------
@pytest.mark.parametrize("kind", ["discrete", "smooth"])
def test_every_protocol_bounds_the_exact_entropy(kind):
    """Exact q_eps as the model on 2-D 8-bit data: bpd ≥ −log2 P(k)/D (paired, within MC error),
    K = 8 ≤ K = 1; on genuinely discrete data the truncated normal ≪ uniform and ≈ exact."""
    x, dist, entropy_bits = _discrete("2d", kind, 1500)
    sde, eps = VPSDE(), 1e-5
    exact = -dist.log_prob_bytes(x) / (2 * LN2)
    assert abs(exact.mean().item() - entropy_bits) < 4 * exact.std().item() / math.sqrt(len(x))
    res = {}
    for proto, k in (("uniform", 1), ("truncated_normal", 1), ("truncated_normal", 8)):
        bpd = bits_per_dim(_exact_logp(dist, sde, eps), x, centered=True, dequantization=proto, num_importance=k,
                           sde=sde, eps=eps, generator=torch.Generator().manual_seed(6)).bpd
        gap = bpd.double() - exact
        se = gap.std().item() / math.sqrt(len(gap))
        assert gap.mean().item() > -4 * se - 1e-4, (proto, k, gap.mean(), se)
        res[(proto, k)] = (bpd.mean().item(), se)
    tn1, tn8 = res[("truncated_normal", 1)], res[("truncated_normal", 8)]
    assert tn8[0] <= tn1[0] + 3 * math.hypot(tn1[1], tn8[1])
    if kind == "discrete":
        assert res[("uniform", 1)][0] > tn1[0] + 1.0  # uniform is loose by > 1 bit/dim here
        assert abs(tn8[0] - exact.mean().item()) < 1e-3  # truncated normal is tight


@pytest.mark.slow
def test_truncated_normal_tends_to_the_exact_entropy_as_eps_shrinks():
    x, dist, _ = _discrete("1d", "discrete", 800)
    sde = VPSDE()
    exact = (-dist.log_prob_bytes(x) / LN2).mean().item()
    gaps = []
    for eps in (1e-2, 1e-3, 1e-4, 1e-6):
        bpd = bits_per_dim(_exact_logp(dist, sde, eps), x, centered=True, dequantization="tn", num_importance=32,
                           sde=sde, eps=eps, generator=torch.Generator().manual_seed(7)).bpd
        gaps.append(bpd.mean().item() - exact)
    assert gaps[-1] < 1e-3 and gaps[0] > gaps[-1]
    assert all(g > -1e-3 for g in gaps), gaps


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.slow
def test_ode_with_the_exact_discrete_score_agrees_with_the_closed_form(sde_name):
    cls, centered = SDES[sde_name]
    sde = cls()
    x, dist, _ = _discrete("1d", "discrete", 100, centered=centered)
    # tight tolerances: at rtol = 1e-5 the solver occasionally mis-tracks a point near a spike (0.5 bits seen)
    ode = ODEOptions(eps=1e-5, divergence="exact", rtol=1e-7, atol=1e-7)
    solves = []

    def log_prob(y):
        solves.append(ode_log_likelihood(dist.score_fn(sde), sde, y.double(), ode))
        return solves[-1].logp

    a = bits_per_dim(log_prob, x, centered=centered, dequantization="tn", sde=sde, eps=1e-5,
                     generator=torch.Generator().manual_seed(8)).bpd
    y, log_q = dequantization_draws(x, centered=centered, dequantization="tn", sde=sde, eps=1e-5,
                                    generator=torch.Generator().manual_seed(8))
    # anchor: the ODE density of the exact score is log q_eps(y) − log q_T(x_T) + log π(x_T) per point
    x_T = solves[0].x_T.double()
    anchor = dist.log_prob(y[0].double(), 1e-5, sde) - dist.log_prob(x_T, 1.0, sde) + sde.prior_logp(x_T)
    torch.testing.assert_close(a.double(), -(anchor - log_q[0]) / LN2, rtol=0, atol=2e-3)
    b = bits_per_dim(_exact_logp(dist, sde, 1e-5), x, centered=centered, dequantization="tn", sde=sde, eps=1e-5,
                     generator=torch.Generator().manual_seed(8)).bpd
    assert (a.double() - b.double()).abs().mean() < 0.05  # the prior mismatch (VE: up to ~0.03 bits here)


# -- names and bad inputs ---------------------------------------------------------------------------
def test_protocol_names():
    assert resolve_protocol("uniform") == "uniform"
    for alias in ("truncated_normal", "tn", "TN", " truncnorm ", "truncated-normal"):
        assert resolve_protocol(alias) == "truncated_normal"
    out = bits_per_dim(_gauss(0.0, 1.0), _bytes(4), centered=True, dequantization="tn", sde=VPSDE())
    assert out.protocol == "truncated_normal"


def test_bad_inputs_name_the_argument():
    x, fn, sde = _bytes(4), _gauss(0.0, 1.0), VPSDE()
    with pytest.raises(ValueError, match="dequantization must be one of"):
        bits_per_dim(fn, x, centered=True, dequantization="gaussian")
    for k in (0, 1.5, -2):
        with pytest.raises(ValueError, match="num_importance"):
            bits_per_dim(fn, x, centered=True, num_importance=k)
    with pytest.raises(ValueError, match="needs sde="):
        bits_per_dim(fn, x, centered=True, dequantization="truncated_normal")
    with pytest.raises(ValueError, match="eps"):
        bits_per_dim(fn, x, centered=True, dequantization="tn", sde=sde, eps=2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bits_per_dim(fn, torch.tensor([[0.5, 1.5]]), centered=True, dequantization="tn", sde=sde, eps=1e-5)
    for bad in (torch.tensor([[0.5, 1.2]]), torch.tensor([[-0.1, 0.5]])):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            bits_per_dim(fn, bad, centered=False)
    with pytest.raises(ValueError, match="uint8 or float"):
        bits_per_dim(fn, torch.tensor([[3, 4]], dtype=torch.int64), centered=False)
    with pytest.raises(ValueError, match="one generator per sample"):
        bits_per_dim(fn, x, centered=True, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="x must be a batch"):
        bits_per_dim(fn, torch.zeros(5, dtype=torch.uint8), centered=False)
