"""Time weightings and proposals of the first-order loss (core/time_sampling.py; docs/design.md §3.1).

Every proposal density is checked against its formula in g², a and σ of the SDE (those are pinned
against closed forms in tests/test_sde.py); the closed-form cumulatives against adaptive quadrature of
the density; the bisection against the cumulative; the draws against the CDF (Kolmogorov-Smirnov);
the per-sample factor w/p̃ against the weighting it stands for; and the pairs of weighting and
proposal that are offered.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import kstest

from hosm_lightning.core import SDE, HOSMObjective, SettingsError, SubVPSDE, VESDE, VPSDE
from hosm_lightning.core import time_sampling as ts

from helpers import LinearSigmaSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
EPS = {"vp": 1e-5, "subvp": 1e-2, "ve": 1e-5}
PROPOSALS = ("importance", "velocity")
#: the (weighting, proposal) pairs that are offered
PAIRS = [("sigma2", "uniform"), ("likelihood", "uniform"), ("likelihood", "importance"), ("likelihood", "velocity")]


def _f64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def _ref_density(sde: SDE, proposal: str, t: torch.Tensor) -> torch.Tensor:
    """p̃(t) written out from (a, σ, g²): 1, g²/σ² (3.7) or g² a² / (σ² (a² + σ²)²) (3.8)."""
    a, sigma = sde.marginal(t)
    g2 = sde.g2(t)
    return {"uniform": torch.ones_like(t), "importance": g2 / sigma**2,
            "velocity": g2 * a**2 / (sigma**2 * (a**2 + sigma**2) ** 2)}[proposal]


def _ref_weight(sde: SDE, weighting: str, t: torch.Tensor) -> torch.Tensor:
    """w(t): 1 ('sigma2') or g²/σ² ('likelihood'), eq. (3.6)."""
    return torch.ones_like(t) if weighting == "sigma2" else sde.g2(t) / sde.marginal(t)[1] ** 2


def _cdf(sde: SDE, proposal: str, eps: float):
    """The proposal's CDF on [eps, T] from the closed-form cumulative, as a numpy function (for kstest)."""
    lo, hi = ts.cumulative(sde, proposal, _f64([eps, sde.T])).tolist()

    def cdf(x):
        x = np.clip(np.asarray(x, dtype=np.float64), eps, sde.T)
        return ((ts.cumulative(sde, proposal, torch.from_numpy(x)) - lo) / (hi - lo)).numpy()

    return cdf


# -- densities and factors ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
def test_densities_and_factors_are_their_formulas(name):
    sde = SDES[name]
    t = _f64([EPS[name], 0.05, 0.3, 0.7, 1.0])
    a, sigma = sde.marginal(t)
    for proposal in ts.TIME_PROPOSALS:
        torch.testing.assert_close(ts.proposal_density(sde, proposal, t), _ref_density(sde, proposal, t),
                                   rtol=1e-12, atol=0)
    torch.testing.assert_close(ts.likelihood_weight(sde, t), sde.g2(t) / sigma**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(ts.velocity_factor(sde, t), ((a**2 + sigma**2) / a) ** 2, rtol=1e-12, atol=0)
    # w/p̃ for every offered pair, including the two written as shortcuts (1 and the velocity factor)
    for weighting, proposal in PAIRS:
        expected = _ref_weight(sde, weighting, t) / _ref_density(sde, proposal, t)
        torch.testing.assert_close(ts.loss_factor(sde, weighting, proposal, t), expected, rtol=1e-12, atol=0)
    assert torch.equal(ts.loss_factor(sde, "likelihood", "importance", t), torch.ones_like(t))
    with pytest.raises(ValueError, match="unknown time proposal 'cosine'"):
        ts.proposal_density(sde, "cosine", t)


# -- the closed-form cumulatives and their inverse ------------------------------------------------
CUMULATIVE_CASES = {**{k: (v, EPS[k]) for k, v in SDES.items()},
                    "vp-other": (VPSDE(beta_min=0.5, beta_max=5.0), 1e-5), "ve-other": (VESDE(0.02, 10.0), 1e-5)}


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("name", list(CUMULATIVE_CASES))
def test_cumulative_increments_are_the_integral_of_the_density(name, proposal):
    """cumulative(hi) − cumulative(lo) = ∫_lo^hi p̃ dt by adaptive quadrature of proposal_density, on
    intervals from eps (where p̃ ~ 1/t for VP and subVP) to T (where a² is ~1e-4 for VP)."""
    sde, eps = CUMULATIVE_CASES[name]
    ends = sorted({eps, *(e for e in (1e-3, 0.05, 0.3, 0.7, 1.0) if e > eps)})
    w = ts.cumulative(sde, proposal, _f64(ends))
    assert w.dtype == torch.float64 and bool((w[1:] > w[:-1]).all())

    def density(t: float) -> float:
        return float(ts.proposal_density(sde, proposal, _f64([t])))

    for lo, hi, dw in zip(ends, ends[1:], (w[1:] - w[:-1]).tolist()):
        integral = quad(density, lo, hi, epsabs=0, epsrel=1e-12, limit=500)[0]
        assert dw == pytest.approx(integral, rel=1e-10), (lo, hi)


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("name", list(SDES))
def test_invert_cumulative_returns_the_quantiles(name, proposal):
    sde, eps = SDES[name], EPS[name]
    u = _f64([0.0, 1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0])
    t = ts.invert_cumulative(sde, proposal, u, eps)
    assert t.dtype == torch.float64 and bool((t[1:] > t[:-1]).all())
    # the end points to float64 resolution of the cumulative (VE's velocity density is ~1e-6 near T)
    assert float(t[0]) == pytest.approx(eps, rel=1e-9) and float(t[-1]) == pytest.approx(sde.T, abs=1e-9)
    torch.testing.assert_close(_f64(_cdf(sde, proposal, eps)(t.numpy())), u, rtol=0, atol=1e-12)


def test_an_sde_without_a_closed_form_has_only_the_uniform_proposal():
    sde, t = LinearSigmaSDE(), _f64([0.2, 0.5])
    assert torch.equal(ts.cumulative(sde, "uniform", t), t)
    for proposal in PROPOSALS:
        with pytest.raises(ValueError, match=rf"no '{proposal}' time proposal for LinearSigmaSDE"):
            ts.cumulative(sde, proposal, t)
    # a subclass of an SDE with a closed form uses its parent's
    class ShortVP(VPSDE):
        T = 0.5

    torch.testing.assert_close(ts.cumulative(ShortVP(), "velocity", t), ts.cumulative(VPSDE(), "velocity", t))


# -- the draws ------------------------------------------------------------------------------------
@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("name", list(SDES))
def test_sample_t_follows_the_proposal(name, proposal):
    """Kolmogorov-Smirnov against the proposal's CDF: a fit (p > 1e-3), while the same draws clearly
    reject the other proposal and the uniform one (p < 1e-10), so the check can fail."""
    sde, eps, n = SDES[name], EPS[name], 20_000
    t = ts.sample_t(sde, proposal, n, eps, torch.Generator().manual_seed(5))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert float(t.min()) >= eps * (1 - 1e-6) and float(t.max()) <= sde.T
    draws = t.double().numpy()
    assert kstest(draws, _cdf(sde, proposal, eps)).pvalue > 1e-3
    other = {"importance": "velocity", "velocity": "importance"}[proposal]
    assert kstest(draws, _cdf(sde, other, eps)).pvalue < 1e-10
    if not (name == "ve" and proposal == "importance"):  # VE's importance proposal is the uniform one
        assert kstest(draws, _cdf(sde, "uniform", eps)).pvalue < 1e-10


@pytest.mark.parametrize("name", list(SDES))
def test_uniform_draws_are_eps_plus_u_times_the_span(name):
    """'uniform' is eps + u (T − eps) of one float64 uniform per sample, returned as float32; every
    proposal uses exactly one float64 uniform per sample, so the generator moves on the same way."""
    sde, eps, n = SDES[name], 1e-3, 1000
    ref = torch.Generator().manual_seed(3)
    u = torch.rand(n, generator=ref, dtype=torch.float64)
    next_draw = torch.rand(4, generator=ref)
    g = torch.Generator().manual_seed(3)
    t = ts.sample_t(sde, "uniform", n, eps, g)
    assert t.dtype == torch.float32 and torch.equal(t, (eps + u * (sde.T - eps)).float())
    assert torch.equal(torch.rand(4, generator=g), next_draw)
    for proposal in PROPOSALS:
        g = torch.Generator().manual_seed(3)
        t = ts.sample_t(sde, proposal, n, eps, g)
        assert torch.equal(torch.rand(4, generator=g), next_draw), proposal
        # the same u, mapped by the proposal's inverse CDF
        assert torch.equal(t, ts.invert_cumulative(sde, proposal, u, eps).float()), proposal


def test_ve_importance_is_the_uniform_proposal():
    """g²/σ² = 2 log(σ_max/σ_min) is constant for VE: the importance draws are the uniform ones (to the
    bisection's precision in float64, to one float32 rounding after the cast)."""
    sde, eps = VESDE(), 1e-5
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(ts.invert_cumulative(sde, "importance", u, eps), eps + u * (sde.T - eps),
                               rtol=0, atol=1e-14)
    uni = ts.sample_t(sde, "uniform", 10_000, eps, torch.Generator().manual_seed(1))
    imp = ts.sample_t(sde, "importance", 10_000, eps, torch.Generator().manual_seed(1))
    assert float((uni - imp).abs().max()) <= 6e-8
    # the velocity proposal of VE is not uniform: it puts most of its mass below σ = 1
    vel = ts.sample_t(sde, "velocity", 10_000, eps, torch.Generator().manual_seed(1))
    assert float((sde.sigma(vel.double()) < 1).double().mean()) > 0.9 > float((sde.sigma(uni.double()) < 1).double().mean())


# -- the factor of dsm1 ---------------------------------------------------------------------------
@pytest.mark.parametrize("weighting,proposal", PAIRS, ids=[f"{w}-{p}" for w, p in PAIRS])
@pytest.mark.parametrize("name", list(SDES))
def test_loss_factor_turns_the_proposal_average_into_the_weighting(name, weighting, proposal):
    """Z E_{t~p}[loss_factor(t) f(t)] = ∫_eps^T w(t) f(t) dt with Z = ∫ p̃ = cumulative(T) − cumulative(eps),
    for a test function f: the expectation by stratified quantiles of the proposal (midpoint rule in u),
    the integral by adaptive quadrature. eps = 1e-3 keeps the midpoint rule accurate for the likelihood
    weighting under the uniform proposal (w ~ 1/t near 0). Without the factor the same average is off
    by 19% to 96%."""
    sde, eps, n = SDES[name], 1e-3, 100_000
    def f(s):  # on floats (quadrature) and on tensors (the draws)
        return 1.0 + (np.sin(5.0 * s) if isinstance(s, float) else torch.sin(5.0 * s))

    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = ts.invert_cumulative(sde, proposal, u, eps)
    lo, hi = ts.cumulative(sde, proposal, _f64([eps, sde.T])).tolist()
    factor = ts.loss_factor(sde, weighting, proposal, t)
    estimate = (hi - lo) * float((factor * f(t)).mean())

    def integrand(s: float) -> float:
        return float(_ref_weight(sde, weighting, _f64([s]))) * f(s)

    target = quad(integrand, eps, sde.T, epsabs=0, epsrel=1e-12, limit=500)[0]
    # the midpoint rule in u is exact to ~1e-6 except for the velocity proposal, which rarely reaches the
    # times near T where its factor ((a² + σ²)/a)² is largest: the last strata miss up to 0.2% there
    assert estimate == pytest.approx(target, rel=1e-6 if proposal != "velocity" else 5e-3)
    # where the factor is not 1, the proposal alone averages another weighting: the factor does the work
    if not torch.allclose(factor, torch.ones_like(factor)):
        assert abs((hi - lo) * float(f(t).mean()) - target) > 0.05 * abs(target)


# -- the pairs offered ----------------------------------------------------------------------------
def test_only_the_likelihood_weighting_takes_a_non_uniform_proposal():
    for weighting in ts.WEIGHTINGS:
        for proposal in ts.TIME_PROPOSALS:
            problem = ts.pairing_error(weighting, proposal)
            assert (problem is None) == ((weighting, proposal) in PAIRS), (weighting, proposal)
            if problem is not None:
                assert "likelihood" in problem and "\n" not in problem
    assert set(PAIRS) | {("sigma2", "importance"), ("sigma2", "velocity")} == {
        (w, p) for w in ts.WEIGHTINGS for p in ts.TIME_PROPOSALS}


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_the_objective_refuses_a_proposal_for_the_sigma2_weighting(proposal):
    with pytest.raises(SettingsError) as err:
        HOSMObjective(weighting="sigma2", time_proposal=proposal)
    assert (err.value.owner, err.value.field) == ("HOSMObjective", "time_proposal")
    message = str(err.value)
    assert message.startswith("HOSMObjective.time_proposal ") and "\n" not in message
    assert repr(proposal) in message and "'sigma2'" in message
    assert HOSMObjective(weighting="likelihood", time_proposal=proposal).time_proposal == proposal
