"""The probability-flow ODE (core/ode.py; docs/design.md §4, §8): its settings ``ODEOptions``, the
likelihood, the sampler and the ODE model's own score, anchored on exact Gaussian-mixture scores."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from helpers import pixel_mixtures
from scipy.integrate import quad

from hosm_lightning.core import (
    VESDE,
    VPSDE,
    GaussianMixture,
    Likelihood,
    ODEOptions,
    ODEScore,
    Samples,
    SettingsError,
    SubVPSDE,
    bits_per_dim,
    dequantization_draws,
    ode_log_likelihood,
    ode_sample,
    ode_score,
    paper_mog1d,
)
from hosm_lightning.core.ode import ADAPTIVE_METHODS, FIXED_STEP_METHODS, METHODS

EPS = 1e-5
LN2 = math.log(2)
ODE = ODEOptions(eps=EPS)


def mix2d() -> GaussianMixture:
    return GaussianMixture(
        means=[[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]],
        variances=[[0.1, 0.3], [0.2, 0.05], [0.4, 0.4]],
        weights=[0.2, 0.5, 0.3],
    )


MIXES = {"paper1d": paper_mog1d, "mix2d": mix2d}
SDES = {"vp": VPSDE, "ve": VESDE}


def anchor(mix, sde, x, x_T, eps=EPS):
    """Exact log-density of the ODE model driven by the exact score (docs/design.md eq. 4.3):
    log q_eps(x) - log q_T(x_T) + log pi(x_T)."""
    x, x_T = x.double().flatten(1), x_T.double().flatten(1)
    return mix.log_prob(x, eps, sde) - mix.log_prob(x_T, sde.T, sde) + sde.prior_logp(x_T)


def recording(score_fn, times):
    """``score_fn`` that appends every time it is evaluated at to ``times``."""

    def fn(x, t):
        times.append(t.double())
        return score_fn(x, t)

    return fn


def prior(sde, n, d, seed, dtype=torch.float32):
    return sde.prior_sample((n, d), generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- ODEOptions ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("rtol", 0.0), ("rtol", -1e-5), ("atol", 0), ("atol", float("nan")), ("rtol", "1e-5"),
        ("eps", 0.0), ("eps", 1.0), ("sample_eps", -1e-3), ("sample_eps", 2.0),
        ("divergence", "trace"), ("method", "rk45"), ("method", "RK45"),
        ("step_size", 0.0), ("step_size", -0.01), ("step_size", float("inf")),
    ],
)
def test_invalid_fields_raise_a_settings_error_naming_the_field(field, value):
    with pytest.raises(SettingsError, match=rf"^ODEOptions\.{field} must") as err:
        ODEOptions(**{field: value})
    assert (err.value.owner, err.value.field) == ("ODEOptions", field)


@pytest.mark.parametrize("method", FIXED_STEP_METHODS)
def test_fixed_step_methods_need_a_step_size(method):
    with pytest.raises(SettingsError, match=rf"^ODEOptions\.step_size must be set .*{method}"):
        ODEOptions(method=method)
    assert ODEOptions(method=method, step_size=0.01).step_size == 0.01


def test_method_names_are_torchdiffeq_solvers():
    solvers = pytest.importorskip("torchdiffeq._impl.odeint").SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    assert set(METHODS) == set(solvers) and len(METHODS) == len(set(METHODS))
    assert {m for m in METHODS if issubclass(solvers[m], FixedGridODESolver)} == set(FIXED_STEP_METHODS)
    assert set(ADAPTIVE_METHODS) == set(METHODS) - set(FIXED_STEP_METHODS) and "dopri5" in ADAPTIVE_METHODS


def test_replace_ignores_none_and_rejects_unknown_keys():
    opts = ODEOptions(eps=0.1, rtol=1e-3)
    new = opts.replace(eps=None, rtol=None, atol=1e-4, method=None)
    assert new == ODEOptions(eps=0.1, rtol=1e-3, atol=1e-4) and new is not opts
    assert opts.atol == 1e-5  # frozen: the original is unchanged
    assert opts.replace(method="rk4", step_size=0.05).method == "rk4"
    with pytest.raises(ValueError, match=r"unknown ODE option\(s\) \['tol'\]; valid: \['eps', 'sample_eps', 'rtol'"):
        opts.replace(tol=1e-3)
    with pytest.raises(SettingsError, match=r"^ODEOptions\.rtol"):  # changes are validated too
        opts.replace(rtol=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.rtol = 1.0


def test_as_dict_is_plain_data():
    opts = ODEOptions(eps=1e-4, rtol=1, method="rk4", step_size=0.02)
    d = opts.as_dict()
    assert d == {"eps": 1e-4, "sample_eps": None, "rtol": 1.0, "atol": 1e-5, "method": "rk4",
                 "divergence": "auto", "step_size": 0.02}
    assert type(d["rtol"]) is float and ODEOptions(**d) == opts
    buf = io.BytesIO()
    torch.save({"ode": d}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["ode"] == d


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE, SubVPSDE])
def test_eps_and_sample_eps_default_to_the_sde(sde_cls):
    """The likelihood starts at ``eps`` and the sampler stops at ``sample_eps``; None is the SDE's default
    for that use (``SDE.resolve_eps``), and ``eps`` is the likelihood's only."""
    sde, mix = sde_cls(), mix2d()
    x = mix.sample(8, torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = prior(sde, 8, 2, 1, torch.float64)
    loose = dict(rtol=1e-3, atol=1e-3)

    def first_and_last(run, opts):
        times = []
        run(recording(mix.score_fn(sde), times), opts)
        ts = torch.cat(times)
        return ts.min().item(), ts.max().item()

    def likelihood(fn, opts):
        return ode_log_likelihood(fn, sde, x, opts)

    def sample(fn, opts):
        return ode_sample(fn, sde, x_T, opts)

    cases = [
        (likelihood, ODEOptions(**loose), sde_cls.default_eps),
        (likelihood, ODEOptions(eps=0.2, sample_eps=0.05, **loose), 0.2),
        (sample, ODEOptions(**loose), sde_cls.default_sample_eps),
        (sample, ODEOptions(eps=0.2, **loose), sde_cls.default_sample_eps),
        (sample, ODEOptions(sample_eps=0.05, **loose), 0.05),
    ]
    for run, opts, eps in cases:
        lo, hi = first_and_last(run, opts)
        assert lo == pytest.approx(eps, rel=1e-12) and hi == pytest.approx(sde.T, rel=1e-12), (run.__name__, opts)


def test_eps_beyond_the_sde_horizon_is_a_clear_error():
    class ShortSDE(VPSDE):
        T = 0.5

    sde, mix = ShortSDE(), mix2d()
    x = mix.sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T=0\.5\)"):
        ode_log_likelihood(mix.score_fn(sde), sde, x, ODEOptions(eps=0.7))
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T=0\.5\)"):
        ode_sample(mix.score_fn(sde), sde, x, ODEOptions(sample_eps=0.7))


@pytest.mark.slow
def test_options_reach_the_solver():
    """Non-default tolerances and divergence change the solve (and are repeatable)."""
    sde, mix = SubVPSDE(), mix2d()
    x = mix.sample(8, torch.Generator().manual_seed(0))
    opts = ODEOptions(rtol=1e-3, atol=1e-4, divergence="hutchinson")
    ours = ode_log_likelihood(mix.score_fn(sde), sde, x, opts, generator=torch.Generator().manual_seed(1))
    again = ode_log_likelihood(mix.score_fn(sde), sde, x, opts, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.logp, again.logp) and ours.nfe == again.nfe
    default = ode_log_likelihood(mix.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1))
    assert ours.nfe < default.nfe
    exact = ode_log_likelihood(mix.score_fn(sde), sde, x, opts.replace(divergence="exact"))
    assert (ours.logp - exact.logp).abs().max() > 1e-3  # the probe is used
    x_T = prior(sde, 8, 2, 2)
    loose, tight = (ode_sample(mix.score_fn(sde), sde, x_T, ODEOptions(rtol=tol, atol=tol)) for tol in (1e-2, 1e-6))
    assert loose.nfe < tight.nfe and not torch.equal(loose.x, tight.x)


def test_fixed_step_rk4_gives_the_exact_gaussian_log_density():
    """Data N(0, s0² I) under VP: q_t = N(0, (a² s0² + σ²) I) and the score is -x / (a² s0² + σ²), so the
    ODE model's density is log q_eps(x) - log q_T(x_T) + log π(x_T) (docs/design.md eq. 4.3)."""
    sde, s0, d = VPSDE(), 0.5, 2

    def var(t):
        a, sigma = sde.marginal(t)
        return a**2 * s0**2 + sigma**2

    def log_q(x, t):
        v = var(torch.full((x.shape[0],), t, dtype=x.dtype))
        return -0.5 * d * torch.log(2 * math.pi * v) - 0.5 * x.pow(2).sum(1) / v

    score = lambda x, t: -x / var(t)[:, None]  # noqa: E731
    x = s0 * torch.randn(16, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = ODEOptions(method="rk4", step_size=0.01, divergence="exact")
    res = ode_log_likelihood(score, sde, x, opts)
    exact = log_q(x, sde.default_eps) - log_q(res.x_T, sde.T) + sde.prior_logp(res.x_T)
    torch.testing.assert_close(res.logp, exact, rtol=0, atol=1e-6)
    assert res.nfe >= 4 * 99  # the step size was honoured: ~100 rk4 steps, not one step over [eps, T]
    coarse = ode_log_likelihood(score, sde, x, opts.replace(step_size=0.5))
    assert (coarse.logp - exact).abs().max() > 1e-4  # the tolerance above has teeth


# -- likelihood -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix_name", list(MIXES))
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.slow
def test_exact_score_reproduces_mixture_density(mix_name, sde_name):
    mix, sde = MIXES[mix_name](), SDES[sde_name]()
    x = mix.sample(300, generator=torch.Generator().manual_seed(0))
    res = ode_log_likelihood(mix.score_fn(sde), sde, x, ODE.replace(divergence="exact"))
    assert isinstance(res, Likelihood)
    assert res.logp.shape == (300,) and res.logp.dtype == torch.float32
    assert isinstance(res.nfe, int) and res.nfe > 0 and res.seconds > 0
    assert res.x_T.shape == x.shape
    torch.testing.assert_close(res.prior_logp + res.delta_logp, res.logp)
    torch.testing.assert_close(res.prior_logp, sde.prior_logp(res.x_T))
    err = (res.logp.double() - anchor(mix, sde, x, res.x_T)).abs()
    assert err.mean() <= 1e-4, err.mean()
    logq = mix.log_prob(x.double(), EPS, sde)
    assert abs(res.logp.double().mean() - logq.mean()) <= 2e-3
    # the prior correction is real but small (up to ~0.02 nats for VE)
    assert (res.logp.double() - logq).abs().max() < 0.05


@pytest.mark.slow
def test_ode_end_state_is_the_pf_ode_image_round_trip():
    """ode_sample from the likelihood's x_T back to eps returns (close to) the starting points."""
    mix, sde = paper_mog1d(), VESDE()
    x = mix.sample(200, generator=torch.Generator().manual_seed(1))
    res = ode_log_likelihood(mix.score_fn(sde), sde, x, ODE)
    back = ode_sample(mix.score_fn(sde), sde, res.x_T, ODEOptions(sample_eps=EPS))
    assert (back.x - x).abs().max() < 2e-3
    assert res.x_T.abs().mean() > 10  # x_T really is at T (prior std 50), not at eps


@pytest.mark.slow
def test_hutchinson_divergence_is_unbiased():
    mix, sde = mix2d(), VPSDE()
    n = 2000
    x = mix.sample(n, generator=torch.Generator().manual_seed(2))
    res = ode_log_likelihood(mix.score_fn(sde), sde, x, ODE.replace(divergence="hutchinson"),
                             generator=torch.Generator().manual_seed(3))
    diff = res.logp.double() - anchor(mix, sde, x, res.x_T)
    se = diff.std().item() / math.sqrt(n)
    assert diff.std() > 1e-3  # the probe really is stochastic
    assert abs(diff.mean().item()) < 4 * se, (diff.mean().item(), se)


@pytest.mark.slow
def test_hutchinson_with_fixed_probe_is_deterministic_and_auto_mode():
    mix, sde = mix2d(), VPSDE()
    x = mix.sample(50, generator=torch.Generator().manual_seed(4))
    v = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(5)).float() * 2 - 1
    hutchinson = ODEOptions(divergence="hutchinson")
    lp1 = ode_log_likelihood(mix.score_fn(sde), sde, x, hutchinson, v=v).logp
    lp2 = ode_log_likelihood(mix.score_fn(sde), sde, x, hutchinson, v=v).logp
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=0)
    # D = 2 <= 4: 'auto' means exact
    lp_auto = ode_log_likelihood(mix.score_fn(sde), sde, x).logp
    lp_exact = ode_log_likelihood(mix.score_fn(sde), sde, x, ODEOptions(divergence="exact")).logp
    torch.testing.assert_close(lp_auto, lp_exact, rtol=0, atol=0)
    assert (lp1 - lp_exact).abs().max() > 1e-3


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    """With one generator per sample, sample i's probe comes from generator i (fixed steps, so the
    solve itself does not depend on the batch either)."""
    mix, sde = mix2d(), VPSDE()
    x = mix.sample(6, generator=torch.Generator().manual_seed(6))
    opts = ODEOptions(method="rk4", step_size=0.05, divergence="hutchinson")
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]  # noqa: E731
    full = ode_log_likelihood(mix.score_fn(sde), sde, x, opts, generator=gens()).logp
    one = ode_log_likelihood(mix.score_fn(sde), sde, x[2:3], opts, generator=gens()[2:3]).logp
    torch.testing.assert_close(full[2:3], one, rtol=1e-5, atol=1e-5)
    other = ode_log_likelihood(mix.score_fn(sde), sde, x[2:3], opts, generator=gens()[3:4]).logp
    assert (other - one).abs().max() > 1e-4  # the probe matters for this point


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
    res = ode_log_likelihood(gauss.score_fn(sde), sde, x, ODE)
    torch.testing.assert_close(res.x_T.double(), x_T, rtol=1e-3, atol=1e-3 * prior_std)
    err = (res.logp.double() - expected).abs()
    assert err.mean() < 1e-4 and err.max() < 5e-4, (err.mean(), err.max())
    # and it is close to the data density at eps (exactly so only if q_T were pi: the off-centre
    # mean m leaves ~0.01 nats of prior mismatch for VP)
    log_q_eps = torch.distributions.Normal(a0 * m, v0.sqrt()).log_prob(x.double()).sum(1)
    assert (res.logp.double() - log_q_eps).abs().max() < 0.05


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.slow
def test_solver_never_evaluates_outside_eps_T(sde_name):
    """Adaptive solvers must not step past the end time (t < 0 makes the VP sigma NaN)."""
    mix, sde = mix2d(), SDES[sde_name]()
    eps32 = torch.tensor(EPS, dtype=torch.float32).double()
    times = []
    x = mix.sample(200, generator=torch.Generator().manual_seed(22))
    ode_log_likelihood(recording(mix.score_fn(sde), times), sde, x, ODE)
    ts = torch.cat(times)
    assert ts.min() >= eps32 and ts.max() <= sde.T, (ts.min(), ts.max())
    times.clear()
    eps = sde.default_sample_eps
    ode_sample(recording(mix.score_fn(sde), times), sde, prior(sde, 200, 2, 8))
    ts = torch.cat(times)
    assert ts.min() >= torch.tensor(eps, dtype=torch.float32).double() and ts.max() <= sde.T, (ts.min(), ts.max())


def test_tiny_drift_does_not_probe_outside_the_interval():
    """A near-zero score (an untrained net) makes torchdiffeq's initial step-size heuristic probe
    t far beyond T; under VE sigma(t) then overflows. Evaluation times must stay in [eps, T]."""
    sde, times = VESDE(), []
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 3
    untrained = lambda y, t: -0.1 * torch.ones_like(y) / sde.marginal(t)[1][:, None]  # noqa: E731  (ε-net output 0.1)
    res = ode_log_likelihood(recording(untrained, times), sde, x, ODEOptions(eps=EPS, rtol=1e-3, atol=1e-3))
    ts = torch.cat(times)
    assert torch.isfinite(res.logp).all() and ts.max() <= sde.T
    assert ts.min() >= torch.tensor(EPS, dtype=torch.float32).double()


# -- sampling ---------------------------------------------------------------------------------------
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


@pytest.mark.slow
def test_ode_sample_paper_mixture_ve():
    mix, sde = paper_mog1d(), VESDE()
    n = 2000
    x_T = prior(sde, n, 1, 7)
    res = ode_sample(mix.score_fn(sde), sde, x_T)
    assert isinstance(res, Samples) and res.x.shape == (n, 1) and isinstance(res.nfe, int) and res.nfe > 0
    grid = torch.linspace(-2.0, 2.5, 100_001, dtype=torch.float64)
    ks = ks_stat(res.x, grid, mixture_cdf(mix, grid, sde.default_sample_eps, sde))
    assert ks < 0.05, ks
    # the prior itself is far from the data: the ODE did the work
    assert ks_stat(x_T, grid, mixture_cdf(mix, grid)) > 0.3
    # denoise=True: the same trajectory, then one Tweedie step at eps
    den = ode_sample(mix.score_fn(sde), sde, x_T, denoise=True)
    assert den.nfe == res.nfe + 1
    eps = torch.full((n,), sde.default_sample_eps)
    a, sigma = sde.marginal(eps)
    tweedie = (res.x + sigma[:, None] ** 2 * mix.score_fn(sde)(res.x, eps)) / a[:, None]
    torch.testing.assert_close(den.x, tweedie, rtol=1e-5, atol=1e-6)
    assert (den.x - res.x).abs().max() > 1e-6
    assert ks_stat(den.x, grid, mixture_cdf(mix, grid)) < 0.05


@pytest.mark.slow
def test_ode_sample_2d_mixture_vp_moments():
    mix, sde = mix2d(), VPSDE()
    n = 2000
    res = ode_sample(mix.score_fn(sde), sde, prior(sde, n, 2, 8))
    assert res.x.shape == (n, 2) and res.nfe > 0
    w = mix.weights[:, None]
    mean = (w * mix.means).sum(0)
    var = (w * (mix.variances + mix.means**2)).sum(0) - mean**2
    x = res.x.double()
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all(), (x.mean(0), mean)
    assert ((x.var(0) / var - 1).abs() < 0.1).all(), (x.var(0), var)


# -- the ODE model's own score ----------------------------------------------------------------------
def centred(mix: GaussianMixture) -> GaussianMixture:
    """The same mixture shifted to mean 0: then q_T matches the prior π to second order, so the ODE
    driven by the exact score has p_t^ODE = q_t up to ~1e-4 (with the paper's mixture, whose mean is
    -0.114, the prior's mean mismatch alone moves ∇log p_t^ODE by ~4e-3 relative at t = 0.9, VE)."""
    mean = (mix.weights[:, None] * mix.means).sum(0)
    return GaussianMixture(mix.means - mean, mix.variances, mix.weights)


MIX2D_SCORE = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.0, 0.0]], [[0.05, 0.1], [0.1, 0.05], [0.3, 0.3]],
                              [0.3, 0.3, 0.4])


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
@pytest.mark.parametrize("mix", [centred(paper_mog1d()), centred(MIX2D_SCORE)], ids=["1d", "2d"])
@pytest.mark.slow
def test_ode_score_of_exact_score_is_the_data_score(sde, mix):
    times = [1e-3, 0.05, 0.3, 0.8]
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(times, dtype=torch.float64).repeat_interleave(30)
    a, s = sde.marginal(t)
    x0 = mix.sample(len(t), g, dtype=torch.float64)
    x = a[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    res = ode_score(mix.score_fn(sde), sde, x, t, ODEOptions(rtol=1e-7, atol=1e-7))
    assert isinstance(res, ODEScore) and res.score.shape == x.shape and res.x_T.shape == x.shape and res.nfe > 0
    s_q = mix.score(x, t, sde)
    for tv in times:
        m = t == tv
        rel = float((res.score[m] - s_q[m]).norm() / s_q[m].norm())
        assert rel <= 1e-3, (tv, rel)


def _linear_ode_score_ve(x, t, s0, k, sde):
    """Gaussian data N(0, s0² I), model s_θ = -k x / v(t), v = s0² + σ(t)²: the VE ODE is linear,
    x_T = (v_T / v_t)^{k/2} x, so ∇log p_t^ODE(x) = -(v_T / v_t)^k x / σ_max²."""
    v_t = s0**2 + sde.marginal(t)[1] ** 2
    v_T = s0**2 + sde.sigma_max**2
    return -((v_T / v_t) ** k)[:, None] * x / sde.sigma_max**2


def _linear_ode_score_vp(x, t, s0, k, sde):
    """VP: h = (-β/2 + β k / (2 v)) x with v(t) = 1 + a(t)²(s0² - 1); x_T = Φ x with
    log Φ = ∫_t^T h/x dτ (scipy quadrature), π = N(0, I): ∇log p_t^ODE(x) = -Φ² x."""
    def rate(tau):
        tt = torch.tensor([tau], dtype=torch.float64)
        beta = float(sde.beta(tt))
        a = float(sde.marginal(tt)[0])
        return -0.5 * beta + 0.5 * beta * k / (1 + a * a * (s0**2 - 1))

    phi = torch.tensor([math.exp(quad(rate, float(tv), sde.T, epsabs=1e-12, epsrel=1e-12)[0]) for tv in t],
                       dtype=torch.float64)
    return -(phi**2)[:, None] * x


@pytest.mark.parametrize("sde,closed", [(VESDE(), _linear_ode_score_ve), (VPSDE(), _linear_ode_score_vp)],
                         ids=["VE", "VP"])
def test_ode_score_closed_form_linear_model(sde, closed):
    """A wrong-scale linear score: s_θ ≠ ∇log p^ODE ≠ ∇log q, all three analytic."""
    s0, k = 0.7, 0.8
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1e-3, 0.02, 0.2, 0.6, 0.95], dtype=torch.float64).repeat_interleave(4)
    x = torch.randn(len(t), 2, generator=g, dtype=torch.float64)

    def v_of(tt):
        a, sig = sde.marginal(tt)
        return a * a * s0**2 + sig * sig

    def score_fn(xx, tt):
        return -k * xx / v_of(tt)[:, None]

    s_ode = ode_score(score_fn, sde, x, t, ODEOptions(rtol=1e-8, atol=1e-8)).score
    expected = closed(x, t, s0, k, sde)
    s_theta, s_q = score_fn(x, t), -x / v_of(t)[:, None]
    assert torch.allclose(s_ode, expected, rtol=1e-4, atol=1e-6), (s_ode - expected).abs().max()
    # the three scores really differ (the test could not pass with s_ODE = s_θ or = ∇log q)
    small_t = t < 0.5
    assert ((s_ode - s_theta)[small_t].norm() / s_theta[small_t].norm()) > 0.05
    assert ((s_ode - s_q)[small_t].norm() / s_q[small_t].norm()) > 0.05


def test_ode_score_rejects_bad_times():
    sde = VESDE()
    x = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="t must be a float or have shape"):
        ode_score(lambda x, t: -x, sde, x, torch.zeros(2))
    for t in (0.0, 1.5):
        with pytest.raises(ValueError, match="t must lie"):
            ode_score(lambda x, t: -x, sde, x, t)


# -- bits/dim through the ODE -----------------------------------------------------------------------
def test_bits_per_dim_through_the_ode_matches_the_exact_density_in_both_conventions():
    """A 4-D mixture in [0,1] space (images [B,1,2,2]) and the same model pushed to [-1,1] by y ↦ 2y - 1:
    bits/dim through the ODE is the anchor density per point, and the two conventions agree."""
    mix01, mix11 = pixel_mixtures()
    y01 = mix01.sample(32, generator=torch.Generator().manual_seed(19), dtype=torch.float64).clamp(0, 1)
    x = torch.round(y01 * 255).to(torch.uint8).reshape(32, 1, 2, 2)
    sde = VPSDE()
    res = {}
    for centered, mix in ((False, mix01), (True, mix11)):
        solves = []

        def log_prob(y, mix=mix, solves=solves):
            solves.append(ode_log_likelihood(mix.score_fn(sde), sde, y, ODE))
            return solves[-1].logp

        out = bits_per_dim(log_prob, x, centered=centered, generator=torch.Generator().manual_seed(20))
        (solve,) = solves
        assert solve.nfe > 0 and solve.x_T.shape == (32, 1, 2, 2)
        # the points the model saw: the same generator draws the same dequantization noise
        pts = dequantization_draws(x, centered=centered, generator=torch.Generator().manual_seed(20))[0][0]
        # per point, the ODE model is the anchor density (docs/design.md §4): tight
        offset = 7 if centered else 8
        model = -anchor(mix, sde, pts, solve.x_T) / (4 * LN2) + offset
        assert (out.bpd.double() - model).abs().max() < 2e-4, (out.bpd.double() - model).abs().max()
        # against the data density q_0 the prior mismatch log pi - log q_T (off-centre data under VP,
        # ~0.02 nats per point here) and q_eps vs q_0 remain: honest tolerance
        exact = -mix.log_prob(pts.double().flatten(1)) / (4 * LN2) + offset
        assert (out.bpd.double() - exact).abs().max() < 1e-2, (out.bpd.double() - exact).abs().max()
        res[centered] = (out.bpd.double(), exact)
    # the two conventions describe (nearly) the same model of the same bytes
    assert (res[False][0] - res[True][0]).abs().max() < 1e-2
    assert (res[False][0].mean() - res[True][0].mean()).abs() < 5e-3
    torch.testing.assert_close(res[False][1], res[True][1], rtol=0, atol=1e-5)


# -- bad inputs -------------------------------------------------------------------------------------
def test_bad_inputs():
    mix, sde = paper_mog1d(), VESDE()
    fn = mix.score_fn(sde)
    x = mix.sample(4, generator=torch.Generator().manual_seed(21))
    with pytest.raises(ValueError, match="x must be a batch"):
        ode_log_likelihood(fn, sde, torch.zeros(3))
    with pytest.raises(ValueError, match="x must be a batch"):
        ode_log_likelihood(fn, sde, torch.zeros(0, 1))
    with pytest.raises(ValueError, match="NaN"):
        ode_log_likelihood(fn, sde, torch.tensor([[0.1], [float("nan")]]))
    with pytest.raises(ValueError, match="x_T must be a batch"):
        ode_sample(fn, sde, torch.zeros(4))
    with pytest.raises(ValueError, match="x_T contains NaN"):
        ode_sample(fn, sde, torch.tensor([[0.1], [float("inf")]]))
    with pytest.raises(ValueError, match="score_fn"):
        ode_log_likelihood(lambda y, t: y[:, :0], sde, x)
    with pytest.raises(ValueError, match="score_fn"):
        ode_sample(lambda y, t: y.flatten(), sde, x)
    with pytest.raises(ValueError, match="score_fn"):
        ode_score(lambda y, t: y.flatten(), sde, x, 0.5)
