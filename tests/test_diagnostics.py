"""The ODE model's own score and the KL identity (hosm_lightning/core/diagnostics.py), against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from hosm_lightning.core import VESDE, VPSDE, GaussianMixture, paper_mog1d
from hosm_lightning.core.diagnostics import REPORT_KEYS, kl_decomposition, ode_score, score_report, sigma_grid


def centred(mix: GaussianMixture) -> GaussianMixture:
    """The same mixture shifted to mean 0: then q_T matches the prior π to second order, so the ODE
    driven by the exact score has p_t^ODE = q_t up to ~1e-4 (with the paper's mixture, whose mean is
    -0.114, the prior's mean mismatch alone moves ∇log p_t^ODE by ~4e-3 relative at t = 0.9, VE)."""
    mean = (mix.weights[:, None] * mix.means).sum(0)
    return GaussianMixture(mix.means - mean, mix.variances, mix.weights)


MIX2D = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.0, 0.0]], [[0.05, 0.1], [0.1, 0.05], [0.3, 0.3]], [0.3, 0.3, 0.4])


def draw(mix, sde, times, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(times, dtype=torch.float64).repeat_interleave(n)
    x0 = mix.sample(len(t), g, dtype=torch.float64)
    a, s = sde.marginal(t)
    return a[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64), t


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
@pytest.mark.parametrize("mix", [centred(paper_mog1d()), centred(MIX2D)], ids=["1d", "2d"])
def test_ode_score_of_exact_score_is_the_data_score(sde, mix):
    times = [1e-3, 0.05, 0.3, 0.8]
    x, t = draw(mix, sde, times, 30)
    s_ode, info = ode_score(mix.score_fn(sde), sde, x, t, rtol=1e-7, atol=1e-7)
    s_q = mix.score(x, t, sde)
    for tv in times:
        m = t == tv
        rel = float((s_ode[m] - s_q[m]).norm() / s_q[m].norm())
        assert rel <= 1e-3, (tv, rel)
    assert info["nfe"] > 0


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

    s_ode, _ = ode_score(score_fn, sde, x, t, rtol=1e-8, atol=1e-8)
    expected = closed(x, t, s0, k, sde)
    s_theta, s_q = score_fn(x, t), -x / v_of(t)[:, None]
    assert torch.allclose(s_ode, expected, rtol=1e-4, atol=1e-6), (s_ode - expected).abs().max()
    # the three scores really differ (the test could not pass with s_ODE = s_θ or = ∇log q)
    small_t = t < 0.5
    assert ((s_ode - s_theta)[small_t].norm() / s_theta[small_t].norm()) > 0.05
    assert ((s_ode - s_q)[small_t].norm() / s_q[small_t].norm()) > 0.05


def test_score_report_of_exact_score_is_zero():
    sde, mix = VESDE(), centred(paper_mog1d())
    times = sigma_grid(sde, 1e-3, 4)
    rep = score_report(mix.score_fn(sde), sde, mix, times=times, n=40, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64, rtol=1e-7, atol=1e-7)
    scale = [g2 * (1.0 / max(s, 0.05) ** 2) for g2, s in zip(rep["g2"], rep["sigma"])]  # ~E g²‖∇log q‖²
    assert rep["first_order"] == pytest.approx([0.0] * 4, abs=1e-12)
    for key in ("self_gap", "fisher", "kl_integrand"):
        assert all(abs(v) <= 1e-5 * sc for v, sc in zip(rep[key], scale)), (key, rep[key])
    assert set(REPORT_KEYS) <= set(rep) and len(rep["t"]) == 4


def test_sigma_grid_is_log_spaced_in_sigma():
    sde = VPSDE()
    ts = sigma_grid(sde, 1e-3, 5)
    log_s = sde.marginal(ts)[1].log()
    steps = log_s[1:] - log_s[:-1]
    assert torch.allclose(steps, steps.mean().expand(4), rtol=0.02)
    assert float(ts[0]) == pytest.approx(1e-3, rel=1e-3) and float(ts[-1]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
def test_kl_identity_with_a_wrong_model(sde):
    """KL(q_eps‖p_eps^ODE) from the ODE likelihood equals KL(q_T‖π) + ½∫ g² E[(s_θ-∇q)ᵀ(∇log p^ODE-∇q)] dt
    (eq. 8.1) for a model that is wrong everywhere: the exact score of a mixture with other weights
    and wider components. Within 3 combined standard errors, and the errors are small enough to matter."""
    data = paper_mog1d()
    model = GaussianMixture(data.means, data.variances * 1.6, [0.4, 0.2, 0.4])
    out = kl_decomposition(model.score_fn(sde), sde, data, n=6000, eps=1e-3 if isinstance(sde, VPSDE) else 1e-5,
                           generator=torch.Generator().manual_seed(3), dtype=torch.float64, rtol=1e-6, atol=1e-6)
    assert out["kl_ode"] > 0.05  # the model is measurably wrong
    assert abs(out["diff"]) <= 3 * out["diff_se"], out
    assert out["diff_se"] <= 0.1 * out["kl_ode"], out


def test_ode_score_rejects_bad_times():
    sde = VESDE()
    x = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="t must"):
        ode_score(lambda x, t: -x, sde, x, torch.zeros(2))
    with pytest.raises(ValueError, match="t must lie"):
        ode_score(lambda x, t: -x, sde, x, 0.0)
