"""Tests of hosm_lightning.core.likelihood, anchored on exact Gaussian-mixture scores (docs/design.md §4)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from hosm_lightning.core.likelihood import bits_per_dim, dequantize, nats_to_bpd, ode_log_likelihood, ode_sample
from hosm_lightning.core.mixtures import GaussianMixture, paper_mog1d
from hosm_lightning.core.sde import VESDE, VPSDE

EPS = 1e-5
LN2 = math.log(2)


def mix2d() -> GaussianMixture:
    return GaussianMixture(
        means=[[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]],
        variances=[[0.1, 0.3], [0.2, 0.05], [0.4, 0.4]],
        weights=[0.2, 0.5, 0.3],
    )


MIXES = {"paper1d": paper_mog1d, "mix2d": mix2d}
SDES = {"vp": VPSDE, "ve": VESDE}


def anchor(mix, sde, x, x_T, eps=EPS):
    """Exact log-density of the ODE model driven by the exact score: log q_eps(x) - log q_T(x_T) + log pi(x_T)."""
    x, x_T = x.double().flatten(1), x_T.double().flatten(1)
    return mix.log_prob(x, eps, sde) - mix.log_prob(x_T, sde.T, sde) + sde.prior_logp(x_T)


def mixture_cdf(mix, grid, t=None, sde=None):
    """CDF of a 1-D mixture q_t on ``grid`` by cumulative trapezoid of the exact density (float64)."""
    dens = mix.log_prob(grid[:, None], t, sde).exp()
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(dens, grid)])
    return cdf / cdf[-1]


def ks_stat(samples, grid, cdf):
    s = samples.double().flatten().sort().values
    n = s.numel()
    f = torch.from_numpy(np.interp(s.numpy(), grid.numpy(), cdf.numpy()))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return torch.maximum((i / n - f).abs(), (f - (i - 1) / n).abs()).max().item()


# -- exactness anchor -------------------------------------------------------------------------------
@pytest.mark.parametrize("mix_name", list(MIXES))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_exact_score_reproduces_mixture_density(mix_name, sde_name):
    mix, sde = MIXES[mix_name](), SDES[sde_name]()
    x = mix.sample(300, generator=torch.Generator().manual_seed(0))
    logp, info = ode_log_likelihood(mix.score_fn(sde), sde, x, eps=EPS, divergence="exact")
    assert logp.shape == (300,) and logp.dtype == torch.float32
    assert isinstance(info["nfe"], int) and info["nfe"] > 0
    assert info["x_T"].shape == x.shape
    torch.testing.assert_close(info["prior_logp"] + info["delta_logp"], logp)
    torch.testing.assert_close(info["prior_logp"], sde.prior_logp(info["x_T"]))
    err = (logp.double() - anchor(mix, sde, x, info["x_T"])).abs()
    assert err.mean() <= 1e-4, err.mean()
    logq = mix.log_prob(x.double(), EPS, sde)
    assert abs(logp.double().mean() - logq.mean()) <= 2e-3
    # the prior correction is real but small (up to ~0.02 nats for VE)
    assert (logp.double() - logq).abs().max() < 0.05


def test_ode_end_state_is_the_pf_ode_image_round_trip():
    """ode_sample from info['x_T'] back to eps returns (close to) the starting points."""
    mix, sde = paper_mog1d(), VESDE()
    x = mix.sample(200, generator=torch.Generator().manual_seed(1))
    _, info = ode_log_likelihood(mix.score_fn(sde), sde, x, eps=EPS)
    back, _ = ode_sample(mix.score_fn(sde), sde, x_T=info["x_T"], eps=EPS)
    assert (back - x).abs().max() < 2e-3
    assert info["x_T"].abs().mean() > 10  # x_T really is at T (prior std 50), not at eps


def test_hutchinson_divergence_is_unbiased():
    mix, sde = mix2d(), VPSDE()
    n = 2000
    x = mix.sample(n, generator=torch.Generator().manual_seed(2))
    logp, info = ode_log_likelihood(
        mix.score_fn(sde), sde, x, eps=EPS, divergence="hutchinson", generator=torch.Generator().manual_seed(3)
    )
    diff = logp.double() - anchor(mix, sde, x, info["x_T"])
    se = diff.std().item() / math.sqrt(n)
    assert diff.std() > 1e-3  # the probe really is stochastic
    assert abs(diff.mean().item()) < 4 * se, (diff.mean().item(), se)


def test_hutchinson_with_fixed_probe_is_deterministic_and_auto_mode():
    mix, sde = mix2d(), VPSDE()
    x = mix.sample(50, generator=torch.Generator().manual_seed(4))
    v = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(5)).float() * 2 - 1
    lp1, _ = ode_log_likelihood(mix.score_fn(sde), sde, x, divergence="hutchinson", v=v)
    lp2, _ = ode_log_likelihood(mix.score_fn(sde), sde, x, divergence="hutchinson", v=v)
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=0)
    # D = 2 <= 4: 'auto' means exact
    lp_auto, _ = ode_log_likelihood(mix.score_fn(sde), sde, x)
    lp_exact, _ = ode_log_likelihood(mix.score_fn(sde), sde, x, divergence="exact")
    torch.testing.assert_close(lp_auto, lp_exact, rtol=0, atol=0)
    assert (lp1 - lp_exact).abs().max() > 1e-3


@pytest.mark.parametrize("sde_name", list(SDES))
def test_gaussian_data_closed_form(sde_name):
    """For N(m, diag(s²)) the PF-ODE flow is affine: x_T = a_T m + sqrt(v_T/v_eps)(x - a_eps m),
    v = a² s² + σ², so log p(x) = log pi(x_T) + 1/2 sum_d log(v_T/v_eps)."""
    sde = SDES[sde_name]()
    m = torch.tensor([0.5, -0.2], dtype=torch.float64)
    s2 = torch.tensor([0.09, 0.5], dtype=torch.float64)
    gauss = GaussianMixture(means=m[None], variances=s2[None])
    g = torch.Generator().manual_seed(6)
    x = (m + s2.sqrt() * 1.5 * torch.randn(100, 2, generator=g, dtype=torch.float64)).float()

    def coefs(t):
        if sde_name == "vp":
            log_a = -0.25 * t * t * (20.0 - 0.1) - 0.5 * t * 0.1
            return math.exp(log_a), -math.expm1(2 * log_a)
        return 1.0, (0.01 * (50.0 / 0.01) ** t) ** 2

    a0, sig2_0 = coefs(EPS)
    a1, sig2_1 = coefs(1.0)
    v0, v1 = a0**2 * s2 + sig2_0, a1**2 * s2 + sig2_1
    x_T = a1 * m + (v1 / v0).sqrt() * (x.double() - a0 * m)
    prior_std = 50.0 if sde_name == "ve" else 1.0
    log_pi = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), prior_std).log_prob(x_T).sum(1)
    expected = log_pi + 0.5 * torch.log(v1 / v0).sum()
    logp, info = ode_log_likelihood(gauss.score_fn(sde), sde, x, eps=EPS)
    torch.testing.assert_close(info["x_T"].double(), x_T, rtol=1e-3, atol=1e-3 * prior_std)
    err = (logp.double() - expected).abs()
    assert err.mean() < 1e-4 and err.max() < 5e-4, (err.mean(), err.max())
    # and it is close to the data density at eps (exactly so only if q_T were pi: the off-centre
    # mean m leaves ~0.01 nats of prior mismatch for VP)
    log_q_eps = torch.distributions.Normal(a0 * m, v0.sqrt()).log_prob(x.double()).sum(1)
    assert (logp.double() - log_q_eps).abs().max() < 0.05


def _recording(score_fn, times):
    def fn(x, t):
        times.append(t.double())
        return score_fn(x, t)

    return fn


@pytest.mark.parametrize("sde_name", list(SDES))
def test_solver_never_evaluates_outside_eps_T(sde_name):
    """Adaptive solvers must not step past the end time (t < 0 makes the VP sigma NaN)."""
    mix, sde = mix2d(), SDES[sde_name]()
    eps32 = torch.tensor(EPS, dtype=torch.float32).double()
    times = []
    x = mix.sample(200, generator=torch.Generator().manual_seed(22))
    ode_log_likelihood(_recording(mix.score_fn(sde), times), sde, x, eps=EPS)
    ts = torch.cat(times)
    assert ts.min() >= eps32 and ts.max() <= sde.T, (ts.min(), ts.max())
    times.clear()
    eps = sde.default_sample_eps
    _, info = ode_sample(_recording(mix.score_fn(sde), times), sde, (200, 2), generator=torch.Generator().manual_seed(8))
    ts = torch.cat(times)
    assert ts.min() >= torch.tensor(eps, dtype=torch.float32).double() and ts.max() <= sde.T, (ts.min(), ts.max())


def test_tiny_drift_does_not_probe_outside_the_interval():
    """A near-zero score (an untrained net) makes torchdiffeq's initial step-size heuristic probe
    t far beyond T; under VE sigma(t) then overflows. Evaluation times must stay in [eps, T]."""
    sde, times = VESDE(), []
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 3
    untrained = lambda y, t: -0.1 * torch.ones_like(y) / sde.marginal(t)[1][:, None]  # noqa: E731  (ε-net output 0.1)
    logp, _ = ode_log_likelihood(_recording(untrained, times), sde, x, eps=EPS, rtol=1e-3, atol=1e-3)
    ts = torch.cat(times)
    assert torch.isfinite(logp).all() and ts.max() <= sde.T and ts.min() >= torch.tensor(EPS, dtype=torch.float32).double()


# -- sampling ---------------------------------------------------------------------------------------
def test_ode_sample_paper_mixture_ve():
    mix, sde = paper_mog1d(), VESDE()
    n = 2000
    x, info = ode_sample(mix.score_fn(sde), sde, (n, 1), generator=torch.Generator().manual_seed(7))
    assert x.shape == (n, 1) and isinstance(info["nfe"], int) and info["nfe"] > 0
    grid = torch.linspace(-2.0, 2.5, 100_001, dtype=torch.float64)
    ks = ks_stat(x, grid, mixture_cdf(mix, grid, sde.default_sample_eps, sde))
    assert ks < 0.05, ks
    # the prior itself is far from the data: the ODE did the work
    x_T = sde.prior_sample((n, 1), generator=torch.Generator().manual_seed(7))
    assert ks_stat(x_T, grid, mixture_cdf(mix, grid)) > 0.3
    # denoise=True: same trajectory (same seed), then one Tweedie step at eps
    xd, info_d = ode_sample(mix.score_fn(sde), sde, (n, 1), generator=torch.Generator().manual_seed(7), denoise=True)
    assert info_d["nfe"] == info["nfe"] + 1
    eps = torch.full((n,), sde.default_sample_eps)
    a, sigma = sde.marginal(eps)
    tweedie = (x + sigma[:, None] ** 2 * mix.score_fn(sde)(x, eps)) / a[:, None]
    torch.testing.assert_close(xd, tweedie, rtol=1e-5, atol=1e-6)
    assert (xd - x).abs().max() > 1e-6
    assert ks_stat(xd, grid, mixture_cdf(mix, grid)) < 0.05


def test_ode_sample_2d_mixture_vp_moments():
    mix, sde = mix2d(), VPSDE()
    n = 2000
    x, info = ode_sample(mix.score_fn(sde), sde, (n, 2), generator=torch.Generator().manual_seed(8))
    assert x.shape == (n, 2) and info["nfe"] > 0
    w = mix.weights[:, None]
    mean = (w * mix.means).sum(0)
    var = (w * (mix.variances + mix.means**2)).sum(0) - mean**2
    x = x.double()
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all(), (x.mean(0), mean)
    assert ((x.var(0) / var - 1).abs() < 0.1).all(), (x.var(0), var)


# -- dequantization and bits/dim --------------------------------------------------------------------
def test_dequantize_uint8_bins_and_float_equivalence():
    g = torch.Generator().manual_seed(9)
    k = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = dequantize(k, torch.Generator().manual_seed(10))
    assert y.shape == k.shape and y.dtype == torch.float32
    kf = k.double()
    assert (y.double() >= kf / 256).all() and (y.double() < (kf + 1) / 256).all()
    u = y.double() * 256 - kf
    assert abs(u.mean().item() - 0.5) < 0.01  # uniform within the bin
    y_float = dequantize(k.float() / 255, torch.Generator().manual_seed(10))
    assert torch.equal(y, y_float)
    assert not torch.equal(y, dequantize(k, torch.Generator().manual_seed(11)))


def test_dequantize_stays_below_upper_bin_edge_in_float32():
    # (k + u) / 256 in float32 rounds up to (k + 1) / 256 for u > 1 - 2^-17 when k >= 128
    k = torch.full((4, 500_000), 255, dtype=torch.uint8)
    y = dequantize(k, torch.Generator().manual_seed(12))
    assert (y < 1.0).all(), int((y >= 1.0).sum())
    assert (y >= 255 / 256).all()


def test_dequantize_rejects_out_of_range_floats():
    with pytest.raises(ValueError):
        dequantize(torch.tensor([[0.5, 1.2]]))
    with pytest.raises(ValueError):
        dequantize(torch.tensor([[-0.1, 0.5]]))


def _uniform_logp(lo, hi):
    """Log-density of the uniform distribution on [lo, hi)^D, -inf outside."""

    def fn(y):
        d = y[0].numel()
        inside = ((y >= lo) & (y < hi)).flatten(1).all(1)
        val = torch.full((y.shape[0],), -d * math.log(hi - lo), dtype=torch.float64)
        return torch.where(inside, val, torch.full_like(val, -math.inf))

    return fn


@pytest.mark.parametrize("centered", [False, True])
def test_bpd_uniform_bytes_is_8_bits(centered):
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 256, (32, 3, 4, 4), generator=g, dtype=torch.uint8)
    fn = _uniform_logp(-1.0, 1.0) if centered else _uniform_logp(0.0, 1.0)
    bpd, info = bits_per_dim(fn, x, centered=centered, generator=torch.Generator().manual_seed(14))
    assert bpd.shape == (32,)
    torch.testing.assert_close(bpd, torch.full((32,), 8.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert torch.isfinite(info["logp"]).all()  # every dequantized point landed in the model's domain


@pytest.mark.parametrize("centered", [False, True])
def test_bpd_seven_bit_bytes(centered):
    g = torch.Generator().manual_seed(15)
    x = torch.randint(0, 128, (32, 3, 4, 4), generator=g, dtype=torch.uint8)
    # uniform on [0, 0.5)^D in [0,1] space (density 2^D), i.e. on [-1, 0)^D in [-1,1] space (density 1)
    fn = _uniform_logp(-1.0, 0.0) if centered else _uniform_logp(0.0, 0.5)
    bpd, info = bits_per_dim(fn, x.float() / 255, centered=centered, generator=torch.Generator().manual_seed(16))
    torch.testing.assert_close(bpd, torch.full((32,), 7.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert torch.isfinite(info["logp"]).all()


def test_nats_to_bpd_formula():
    logp = torch.tensor([-10.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([10 / (5 * LN2) + 8, -3 / (5 * LN2) + 8], dtype=torch.float64)
    torch.testing.assert_close(nats_to_bpd(logp, 5, centered=False), expected)
    torch.testing.assert_close(nats_to_bpd(logp, 5, centered=True), nats_to_bpd(logp, 5, centered=False) - 1)


def _image_mixtures():
    """A 4-D mixture in [0,1] space (images [B,1,2,2]) and the same model pushed to [-1,1]: y ↦ 2y-1."""
    means = torch.tensor([[0.3, 0.4, 0.5, 0.6], [0.7, 0.6, 0.5, 0.4], [0.5, 0.5, 0.2, 0.8]], dtype=torch.float64)
    var = torch.tensor([[0.010, 0.020, 0.015, 0.010], [0.020, 0.010, 0.010, 0.020], [0.015, 0.015, 0.010, 0.010]], dtype=torch.float64)
    w = [0.3, 0.3, 0.4]
    return GaussianMixture(means, var, w), GaussianMixture(2 * means - 1, 4 * var, w)


def _image_bytes(mix01, n, seed):
    y = mix01.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).clamp(0, 1)
    return torch.round(y * 255).to(torch.uint8).reshape(n, 1, 2, 2)


def test_bpd_exact_density_is_scale_invariant():
    mix01, mix11 = _image_mixtures()
    x = _image_bytes(mix01, 256, 17)

    def exact(mix):
        return lambda y: mix.log_prob(y.double().flatten(1))

    b01, _ = bits_per_dim(exact(mix01), x, centered=False, generator=torch.Generator().manual_seed(18))
    b11, _ = bits_per_dim(exact(mix11), x, centered=True, generator=torch.Generator().manual_seed(18))
    torch.testing.assert_close(b01, b11, rtol=0, atol=1e-5)
    assert torch.isfinite(b01).all()
    # the offset matters: the [0,1] offset applied to the centered model's density is 1 bit off
    b11_wrong = nats_to_bpd(mix11.log_prob(2 * dequantize(x, torch.Generator().manual_seed(18)).double().flatten(1) - 1), 4, False)
    assert (b11_wrong - b01).abs().min() > 0.99


def test_bpd_through_ode_matches_exact_density_in_both_conventions():
    mix01, mix11 = _image_mixtures()
    sde = VPSDE()
    x = _image_bytes(mix01, 32, 19)
    res = {}
    for centered, mix in ((False, mix01), (True, mix11)):
        fn = functools.partial(ode_log_likelihood, mix.score_fn(sde), sde, eps=EPS)
        bpd, info = bits_per_dim(fn, x, centered=centered, generator=torch.Generator().manual_seed(20))
        assert info["nfe"] > 0 and info["x_T"].shape == (32, 1, 2, 2)
        y = dequantize(x, torch.Generator().manual_seed(20)).double()
        y = 2 * y - 1 if centered else y
        # per point, the ODE model is the anchor density (docs/design.md §4): tight
        model = nats_to_bpd(anchor(mix, sde, y, info["x_T"]), 4, centered)
        assert (bpd.double() - model).abs().max() < 2e-4, (bpd.double() - model).abs().max()
        # against the data density q_0 the prior mismatch log pi - log q_T (off-centre data under VP,
        # ~0.02 nats per point here) and q_eps vs q_0 remain: honest tolerance
        exact = nats_to_bpd(mix.log_prob(y.flatten(1)), 4, centered)
        assert (bpd.double() - exact).abs().max() < 1e-2, (bpd.double() - exact).abs().max()
        res[centered] = (bpd.double(), exact)
    # the two conventions describe (nearly) the same model of the same bytes
    assert (res[False][0] - res[True][0]).abs().max() < 1e-2
    assert (res[False][0].mean() - res[True][0].mean()).abs() < 5e-3
    torch.testing.assert_close(res[False][1], res[True][1], rtol=0, atol=1e-5)


# -- bad inputs -------------------------------------------------------------------------------------
def test_bad_inputs():
    mix, sde = paper_mog1d(), VESDE()
    fn = mix.score_fn(sde)
    x = mix.sample(4, generator=torch.Generator().manual_seed(21))
    with pytest.raises(ValueError, match="x"):
        ode_log_likelihood(fn, sde, torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        ode_log_likelihood(fn, sde, torch.tensor([[0.1], [float("nan")]]))
    for eps in (0.0, 1.5, -1e-3):
        with pytest.raises(ValueError, match="eps"):
            ode_log_likelihood(fn, sde, x, eps=eps)
        with pytest.raises(ValueError, match="eps"):
            ode_sample(fn, sde, (4, 1), eps=eps)
    with pytest.raises(ValueError, match="score_fn"):
        ode_log_likelihood(lambda y, t: y[:, :0], sde, x)
    with pytest.raises(ValueError, match="score_fn"):
        ode_sample(lambda y, t: y.flatten(), sde, (4, 1))
    with pytest.raises(ValueError, match="divergence"):
        ode_log_likelihood(fn, sde, x, divergence="foo")
    with pytest.raises(ValueError):
        ode_sample(fn, sde)
    with pytest.raises(ValueError, match="x"):
        bits_per_dim(lambda y: torch.zeros(y.shape[0]), torch.zeros(5, dtype=torch.uint8), centered=False)
