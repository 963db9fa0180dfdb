"""ODEOptions: one validated set of probability-flow ODE settings (docs/design.md §4)."""

from __future__ import annotations

import dataclasses
import inspect
import io
import math

import pytest
import torch

from hosm_lightning.core import GaussianMixture, ODEOptions, SubVPSDE, VESDE, VPSDE
from hosm_lightning.core.likelihood import ode_log_likelihood, ode_sample
from hosm_lightning.core.ode_options import ADAPTIVE_METHODS, FIXED_STEP_METHODS, METHODS

MIX = GaussianMixture(means=[[-1.0, 0.5], [1.0, 1.0]], variances=[[0.1, 0.3], [0.2, 0.05]], weights=[0.4, 0.6])


@pytest.mark.parametrize(
    "field,value",
    [
        ("rtol", 0.0), ("rtol", -1e-5), ("atol", 0), ("atol", float("nan")), ("rtol", "1e-5"),
        ("eps", 0.0), ("eps", 1.0), ("sample_eps", -1e-3), ("sample_eps", 2.0),
        ("divergence", "trace"), ("method", "rk45"), ("method", "RK45"),
        ("step_size", 0.0), ("step_size", -0.01), ("step_size", float("inf")),
    ],
)
def test_invalid_fields_name_the_config_key(field, value):
    with pytest.raises(ValueError, match=rf"^model\.ode\.{field} must"):
        ODEOptions(**{field: value})


@pytest.mark.parametrize("method", FIXED_STEP_METHODS)
def test_fixed_step_methods_need_a_step_size(method):
    with pytest.raises(ValueError, match=rf"^model\.ode\.step_size must be set .*{method}"):
        ODEOptions(method=method)
    assert ODEOptions(method=method, step_size=0.01).step_size == 0.01


def test_method_names_are_torchdiffeq_solvers():
    solvers = pytest.importorskip("torchdiffeq._impl.odeint").SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    assert set(METHODS) == set(solvers) and len(METHODS) == len(set(METHODS))
    assert {m for m in METHODS if issubclass(solvers[m], FixedGridODESolver)} == set(FIXED_STEP_METHODS)
    assert "dopri5" in ADAPTIVE_METHODS


def test_replace_ignores_none_and_rejects_unknown_keys():
    opts = ODEOptions(eps=0.1, rtol=1e-3)
    new = opts.replace(eps=None, rtol=None, atol=1e-4, method=None)
    assert new == ODEOptions(eps=0.1, rtol=1e-3, atol=1e-4) and new is not opts
    assert opts.atol == 1e-5  # frozen: the original is unchanged
    assert opts.replace(method="rk4", step_size=0.05).method == "rk4"
    with pytest.raises(ValueError, match=r"unknown ODE option\(s\) \['tol'\]; valid: \['eps', 'sample_eps', 'rtol'"):
        opts.replace(tol=1e-3)
    with pytest.raises(ValueError, match=r"model\.ode\.rtol"):  # changes are validated too
        opts.replace(rtol=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.rtol = 1.0


def test_kwargs_are_exactly_the_solver_keywords():
    opts = ODEOptions(method="euler", step_size=0.1)
    ll, sa = opts.likelihood_kwargs(VPSDE()), opts.sample_kwargs(VPSDE())
    assert set(ll) == {"eps", "rtol", "atol", "method", "divergence", "options"}
    assert set(sa) == {"eps", "rtol", "atol", "method", "options"}
    for fn, kw in ((ode_log_likelihood, ll), (ode_sample, sa)):
        params = inspect.signature(fn).parameters
        assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in kw)
    assert ll["options"] == {"step_size": 0.1} and sa["options"] == {"step_size": 0.1}
    assert ODEOptions().likelihood_kwargs(VPSDE())["options"] is None  # adaptive: no step_size option
    assert ODEOptions(step_size=0.1).likelihood_kwargs(VPSDE())["options"] is None


def test_likelihood_kwargs_equal_the_explicit_call():
    """Non-default settings, so a dropped or misnamed keyword changes logp or the NFE."""
    sde = SubVPSDE()
    x = MIX.sample(8, torch.Generator().manual_seed(0))
    opts = ODEOptions(rtol=1e-3, atol=1e-4, divergence="hutchinson")
    kw = opts.likelihood_kwargs(sde)
    assert kw["eps"] == SubVPSDE.default_eps == 1e-2
    ours, info = ode_log_likelihood(MIX.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1), **kw)
    ref, ref_info = ode_log_likelihood(MIX.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1), eps=1e-2,
                                       rtol=1e-3, atol=1e-4, method="dopri5", divergence="hutchinson", options=None)
    assert torch.equal(ours, ref) and info["nfe"] == ref_info["nfe"]
    default, _ = ode_log_likelihood(MIX.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(ours, default)


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
    kw = opts.likelihood_kwargs(sde)
    logp, info = ode_log_likelihood(score, sde, x, **kw)
    exact = log_q(x, kw["eps"]) - log_q(info["x_T"], sde.T) + sde.prior_logp(info["x_T"])
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-6)
    assert info["nfe"] >= 4 * 99  # the step size was honoured: ~100 rk4 steps, not one step over [eps, T]
    coarse, _ = ode_log_likelihood(score, sde, x, **opts.replace(step_size=0.5).likelihood_kwargs(sde))
    assert (coarse - exact).abs().max() > 1e-4  # the tolerance above has teeth


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE, SubVPSDE])
def test_sample_kwargs_use_the_sde_default_sample_eps(sde_cls):
    sde = sde_cls()
    assert ODEOptions().sample_kwargs(sde)["eps"] == sde_cls.default_sample_eps
    assert ODEOptions(eps=0.2).sample_kwargs(sde)["eps"] == sde_cls.default_sample_eps  # eps is the likelihood's
    assert ODEOptions(sample_eps=0.05).sample_kwargs(sde)["eps"] == 0.05
    assert ODEOptions().likelihood_kwargs(sde)["eps"] == sde_cls.default_eps


def test_sample_kwargs_equal_the_explicit_call():
    sde = VPSDE()
    x_T = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    kw = ODEOptions(rtol=1e-3, atol=1e-3).sample_kwargs(sde)
    ours, info = ode_sample(MIX.score_fn(sde), sde, x_T=x_T, **kw)
    ref, ref_info = ode_sample(MIX.score_fn(sde), sde, x_T=x_T, eps=1e-3, rtol=1e-3, atol=1e-3, method="dopri5")
    assert torch.equal(ours, ref) and info["nfe"] == ref_info["nfe"]


def test_eps_beyond_the_sde_horizon_is_a_clear_error():
    class ShortSDE(VPSDE):
        T = 0.5

    with pytest.raises(ValueError, match=r"model\.ode\.eps must lie in \(0, T=0\.5\)"):
        ODEOptions(eps=0.7).likelihood_kwargs(ShortSDE())
    with pytest.raises(ValueError, match=r"model\.ode\.sample_eps"):
        ODEOptions(sample_eps=0.7).sample_kwargs(ShortSDE())


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
